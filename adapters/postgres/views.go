package postgres

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/domain"
)

// AlertView is an alert as operators see it.
type AlertView struct {
	ID             string    `json:"id"`
	Kind           string    `json:"kind"`
	Severity       string    `json:"severity"`
	State          string    `json:"state"`
	DealID         *string   `json:"deal_id"`
	IdempotencyKey *string   `json:"idempotency_key"`
	DeadLetterID   *string   `json:"dead_letter_id"`
	Message        string    `json:"message"`
	CreatedAt      time.Time `json:"created_at"`
	UpdatedAt      time.Time `json:"updated_at"`
}

// ListAlerts returns alerts, newest first; state "" means any.
func (s *Store) ListAlerts(ctx context.Context, state string, limit int) ([]AlertView, error) {
	rows, err := s.pool.Query(ctx, `SELECT id::text, kind, severity, state, deal_id::text, idempotency_key, dead_letter_id::text,
			message, created_at, updated_at
		FROM alerts WHERE ($1 = '' OR state = $1) ORDER BY created_at DESC, id LIMIT $2`, state, limit)
	if err != nil {
		return nil, fmt.Errorf("cannot list alerts: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (AlertView, error) {
		var a AlertView
		err := r.Scan(&a.ID, &a.Kind, &a.Severity, &a.State, &a.DealID, &a.IdempotencyKey, &a.DeadLetterID, &a.Message, &a.CreatedAt, &a.UpdatedAt)
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("cannot list alerts: %w", err)
	}
	if out == nil {
		out = []AlertView{}
	}
	return out, nil
}

// DeadLetterView is a dead letter as operators see it.
type DeadLetterView struct {
	ID             string            `json:"id"`
	State          string            `json:"state"`
	DealID         *string           `json:"deal_id"`
	IdempotencyKey *string           `json:"idempotency_key"`
	MessageUUID    string            `json:"message_uuid"`
	Topic          string            `json:"topic"`
	Handler        string            `json:"handler"`
	Payload        json.RawMessage   `json:"payload,omitempty"`
	PayloadText    *string           `json:"payload_text,omitempty"`
	Metadata       map[string]string `json:"metadata"`
	Reason         string            `json:"reason"`
	ErrorClass     string            `json:"error_class"`
	Attempts       int               `json:"attempts"`
	FirstFailureAt time.Time         `json:"first_failure_at"`
	LastFailureAt  time.Time         `json:"last_failure_at"`
	Revision       int               `json:"revision"`
	NeedsApproval  bool              `json:"needs_approval"`
	ApprovedBy     *string           `json:"approved_by"`
	Reinjects      int               `json:"reinjects"`
	CreatedAt      time.Time         `json:"created_at"`
	UpdatedAt      time.Time         `json:"updated_at"`
}

// DeadLetterFilter selects dead letters. Zero fields select everything.
type DeadLetterFilter struct {
	State      string    `json:"state,omitempty"`
	ErrorClass string    `json:"error_class,omitempty"`
	Reason     string    `json:"reason,omitempty"` // words that must all appear in the reason
	Since      time.Time `json:"since,omitzero"`
	Until      time.Time `json:"until,omitzero"`
	DealID     string    `json:"deal_id,omitempty"`
	Topic      string    `json:"topic,omitempty"`
	Handler    string    `json:"handler,omitempty"`
}

// where renders the filter as SQL conditions over dead_letters.
func (f DeadLetterFilter) where(args *[]any) string {
	var conds []string
	add := func(cond string, v any) {
		*args = append(*args, v)
		conds = append(conds, fmt.Sprintf(cond, len(*args)))
	}
	if f.State != "" {
		add("state = $%d", f.State)
	}
	if f.ErrorClass != "" {
		add("error_class = $%d", f.ErrorClass)
	}
	if strings.TrimSpace(f.Reason) != "" {
		add("reason_search @@ plainto_tsquery('simple', $%d)", f.Reason)
	}
	if !f.Since.IsZero() {
		add("created_at >= $%d", f.Since)
	}
	if !f.Until.IsZero() {
		add("created_at < $%d", f.Until)
	}
	if f.DealID != "" {
		if !validUUID(f.DealID) {
			conds = append(conds, "false")
		} else {
			add("deal_id = $%d", f.DealID)
		}
	}
	if f.Topic != "" {
		add("topic = $%d", f.Topic)
	}
	if f.Handler != "" {
		add("handler = $%d", f.Handler)
	}
	if len(conds) == 0 {
		return "true"
	}
	return strings.Join(conds, " AND ")
}

// Validate checks the filter's values.
func (f DeadLetterFilter) Validate() error {
	switch f.State {
	case "", domain.DLStateOpen, domain.DLStateReinjected, domain.DLStateDiscarded, domain.DLStateResolved:
	default:
		return &domain.ValidationError{Field: "state", Reason: "must be open, reinjected, discarded or resolved"}
	}
	if f.DealID != "" && !validUUID(f.DealID) {
		return &domain.ValidationError{Field: "deal_id", Reason: "must be a deal id (UUID)"}
	}
	if !f.Since.IsZero() && !f.Until.IsZero() && !f.Since.Before(f.Until) {
		return &domain.ValidationError{Field: "until", Reason: "must be after since"}
	}
	return nil
}

// Cursor is an opaque keyset position in a dead-letter listing.
type Cursor string

func encodeCursor(at time.Time, id string) Cursor {
	return Cursor(base64.RawURLEncoding.EncodeToString([]byte(at.UTC().Format(time.RFC3339Nano) + "|" + id)))
}

func decodeCursor(c Cursor) (time.Time, string, error) {
	b, err := base64.RawURLEncoding.DecodeString(string(c))
	if err != nil {
		return time.Time{}, "", &domain.ValidationError{Field: "cursor", Reason: "is not a cursor from a previous page"}
	}
	ts, id, ok := strings.Cut(string(b), "|")
	at, err := time.Parse(time.RFC3339Nano, ts)
	if !ok || err != nil || !validUUID(id) {
		return time.Time{}, "", &domain.ValidationError{Field: "cursor", Reason: "is not a cursor from a previous page"}
	}
	return at, id, nil
}

// DeadLetterPage is one page of a listing; Next is empty on the last page.
type DeadLetterPage struct {
	Items []DeadLetterView `json:"items"`
	Next  Cursor           `json:"next,omitempty"`
}

// ListDeadLetters returns dead letters matching f, newest first, limit per
// page, after the cursor (keyset pagination on (created_at, id): each page
// costs the same at any depth).
func (s *Store) ListDeadLetters(ctx context.Context, f DeadLetterFilter, after Cursor, limit int) (DeadLetterPage, error) {
	if err := f.Validate(); err != nil {
		return DeadLetterPage{}, err
	}
	if limit < 1 || limit > 1000 {
		return DeadLetterPage{}, &domain.ValidationError{Field: "limit", Reason: "must be between 1 and 1000"}
	}
	var args []any
	where := f.where(&args)
	if after != "" {
		at, id, err := decodeCursor(after)
		if err != nil {
			return DeadLetterPage{}, err
		}
		args = append(args, at, id)
		where += fmt.Sprintf(" AND (created_at, id) < ($%d, $%d::uuid)", len(args)-1, len(args))
	}
	args = append(args, limit+1)
	rows, err := s.pool.Query(ctx, `SELECT id::text, state, deal_id::text, idempotency_key, message_uuid, topic, handler, payload, metadata,
			reason, error_class, attempts, first_failure_at, last_failure_at, revision, needs_approval, approved_by, reinjects, created_at, updated_at
		FROM dead_letters WHERE `+where+
		// Qualified: a bare "id" would name the output column id::text, and
		// a sort by text cannot use dead_letters_page_idx.
		fmt.Sprintf(` ORDER BY dead_letters.created_at DESC, dead_letters.id DESC LIMIT $%d`, len(args)), args...)
	if err != nil {
		return DeadLetterPage{}, fmt.Errorf("cannot list dead letters: %w", err)
	}
	items, err := pgx.CollectRows(rows, scanDeadLetter)
	if err != nil {
		return DeadLetterPage{}, fmt.Errorf("cannot list dead letters: %w", err)
	}
	page := DeadLetterPage{Items: items}
	if page.Items == nil {
		page.Items = []DeadLetterView{}
	}
	if len(page.Items) > limit {
		page.Items = page.Items[:limit]
		last := page.Items[limit-1]
		page.Next = encodeCursor(last.CreatedAt, last.ID)
	}
	return page, nil
}

func scanDeadLetter(r pgx.CollectableRow) (DeadLetterView, error) {
	var (
		d       DeadLetterView
		payload []byte
	)
	err := r.Scan(&d.ID, &d.State, &d.DealID, &d.IdempotencyKey, &d.MessageUUID, &d.Topic, &d.Handler, &payload, &d.Metadata,
		&d.Reason, &d.ErrorClass, &d.Attempts, &d.FirstFailureAt, &d.LastFailureAt, &d.Revision, &d.NeedsApproval, &d.ApprovedBy,
		&d.Reinjects, &d.CreatedAt, &d.UpdatedAt)
	if json.Valid(payload) {
		d.Payload = payload
	} else {
		t := string(payload)
		d.PayloadText = &t
	}
	return d, err
}

// DeadLetterDetail is everything about one dead letter: the entry, every
// revision, every event of its stream, and the ERP attempts of its saga.
type DeadLetterDetail struct {
	DeadLetterView
	Revisions      []domain.Revision `json:"revisions"`
	History        []EventView       `json:"history"`
	AttemptHistory []EventView       `json:"attempt_history"`
}

// GetDeadLetter returns one dead letter in full.
func (s *Store) GetDeadLetter(ctx context.Context, id string) (DeadLetterDetail, error) {
	if !validUUID(id) {
		return DeadLetterDetail{}, fmt.Errorf("dead letter %q: %w", id, domain.ErrNotFound)
	}
	rows, err := s.pool.Query(ctx, `SELECT id::text, state, deal_id::text, idempotency_key, message_uuid, topic, handler, payload, metadata,
			reason, error_class, attempts, first_failure_at, last_failure_at, revision, needs_approval, approved_by, reinjects, created_at, updated_at
		FROM dead_letters WHERE id=$1`, id)
	if err != nil {
		return DeadLetterDetail{}, fmt.Errorf("cannot read dead letter %s: %w", id, err)
	}
	items, err := pgx.CollectRows(rows, scanDeadLetter)
	if err != nil {
		return DeadLetterDetail{}, fmt.Errorf("cannot read dead letter %s: %w", id, err)
	}
	if len(items) == 0 {
		return DeadLetterDetail{}, fmt.Errorf("dead letter %s: %w", id, domain.ErrNotFound)
	}
	det := DeadLetterDetail{DeadLetterView: items[0]}
	recs, err := LoadStream(ctx, s.pool, domain.DeadLetterStream(id))
	if err != nil {
		return DeadLetterDetail{}, err
	}
	evs := make([]domain.Event, len(recs))
	for i, r := range recs {
		evs[i] = r.Event
	}
	dl, err := domain.RehydrateDeadLetter(evs)
	if err != nil {
		return DeadLetterDetail{}, err
	}
	det.Revisions = dl.Revisions
	if det.History, err = s.streamViews(ctx, []string{domain.DeadLetterStream(id)}, ""); err != nil {
		return DeadLetterDetail{}, err
	}
	// Every saga this entry ran under (the first key and any new key).
	keys := []string{}
	if det.IdempotencyKey != nil {
		keys = append(keys, domain.SagaStream(*det.IdempotencyKey))
	}
	for _, r := range recs {
		if e, ok := r.Event.(domain.MessageDeadLettered); ok && e.IdempotencyKey != "" {
			keys = append(keys, domain.SagaStream(e.IdempotencyKey))
		}
	}
	if det.AttemptHistory, err = s.streamViews(ctx, keys, domain.TypeInvoiceAttemptFailed); err != nil {
		return DeadLetterDetail{}, err
	}
	return det, nil
}

func (s *Store) streamViews(ctx context.Context, streams []string, typ string) ([]EventView, error) {
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT ON (position) position, type, stream_version, schema_version, payload, recorded_at
		FROM events WHERE stream_id = ANY($1) AND ($2 = '' OR type = $2) ORDER BY position`, streams, typ)
	if err != nil {
		return nil, fmt.Errorf("cannot read events: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (EventView, error) {
		var e EventView
		err := r.Scan(&e.Position, &e.Type, &e.StreamVersion, &e.SchemaVersion, &e.Payload, &e.RecordedAt)
		return e, err
	})
	if err != nil {
		return nil, fmt.Errorf("cannot read events: %w", err)
	}
	if out == nil {
		out = []EventView{}
	}
	return out, nil
}

// AuditFilter selects audit rows.
type AuditFilter struct {
	Actor      string
	Action     string
	TargetType string
	TargetID   string
	Limit      int
}

// ListAudit returns audit rows, newest first.
func (s *Store) ListAudit(ctx context.Context, f AuditFilter) ([]AuditEntry, error) {
	limit := f.Limit
	if limit < 1 || limit > 10000 {
		limit = 100
	}
	rows, err := s.pool.Query(ctx, `SELECT id, at, actor, role, action, target_type, target_id, reason, before_hash, after_hash, diff,
			request_id, operation_id::text
		FROM audit_log
		WHERE ($1 = '' OR actor = $1) AND ($2 = '' OR action = $2) AND ($3 = '' OR target_type = $3) AND ($4 = '' OR target_id = $4)
		ORDER BY id DESC LIMIT $5`, f.Actor, f.Action, f.TargetType, f.TargetID, limit)
	if err != nil {
		return nil, fmt.Errorf("cannot list audit log: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (AuditEntry, error) {
		var a AuditEntry
		var diff []byte
		err := r.Scan(&a.ID, &a.At, &a.Actor, &a.Role, &a.Action, &a.TargetType, &a.TargetID, &a.Reason, &a.BeforeHash, &a.AfterHash,
			&diff, &a.RequestID, &a.OperationID)
		if len(diff) > 0 {
			a.Diff = diff
		}
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("cannot list audit log: %w", err)
	}
	if out == nil {
		out = []AuditEntry{}
	}
	return out, nil
}
