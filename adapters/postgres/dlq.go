package postgres

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
	"github.com/dealbridge/dealbridge/projections"
)

// Actor is who performs an operator action, as the audit log records it.
type Actor struct {
	Name      string
	Role      string
	RequestID string
}

func (a Actor) meta() domain.Metadata {
	return domain.Metadata{CorrelationID: a.RequestID, Actor: a.Name}
}

// reinjectableTopics is the allowlist of topics a dead letter may be
// re-injected into; the topic comes from the stored entry, never from the
// request.
var reinjectableTopics = map[string]bool{outbox.InvoiceTopic: true}

// DefaultMaxReinjects is the loop guard: how often one entry may be
// re-injected.
const DefaultMaxReinjects = 5

// AuditEntry is one row of the audit log.
type AuditEntry struct {
	ID          int64           `json:"id"`
	At          time.Time       `json:"at"`
	Actor       string          `json:"actor"`
	Role        string          `json:"role"`
	Action      string          `json:"action"`
	TargetType  string          `json:"target_type"`
	TargetID    string          `json:"target_id"`
	Reason      string          `json:"reason"`
	BeforeHash  *string         `json:"before_hash"`
	AfterHash   *string         `json:"after_hash"`
	Diff        json.RawMessage `json:"diff,omitempty"`
	RequestID   *string         `json:"request_id"`
	OperationID *string         `json:"operation_id"`
}

// hashOf returns the SHA-256 of b. A JSON document is hashed in a canonical
// spelling (keys sorted, no insignificant space, numbers as written), so
// that one content has one hash whoever spelt it: the event log's jsonb
// reorders keys, and the after hash of an edit must equal the before hash of
// the next action on the entry.
func hashOf(b []byte) *string {
	if b == nil {
		return nil
	}
	if json.Valid(b) {
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.UseNumber()
		var v any
		if dec.Decode(&v) == nil {
			if c, err := json.Marshal(v); err == nil {
				b = c
			}
		}
	}
	h := sha256.Sum256(b)
	s := hex.EncodeToString(h[:])
	return &s
}

// auditTx appends an audit row through tx: the action and its record commit
// together or not at all (invariant I7).
func auditTx(ctx context.Context, tx pgx.Tx, a Actor, action, targetType, targetID, reason string, before, after []byte, diff json.RawMessage, opID string) error {
	if _, err := tx.Exec(ctx, auditSQL, auditArgs(a, action, targetType, targetID, reason, before, after, diff, opID)...); err != nil {
		return fmt.Errorf("cannot write audit log: %w", err)
	}
	return nil
}

const auditSQL = `INSERT INTO audit_log (actor, role, action, target_type, target_id, reason, before_hash, after_hash, diff, request_id, operation_id)
		VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)`

func auditArgs(a Actor, action, targetType, targetID, reason string, before, after []byte, diff json.RawMessage, opID string) []any {
	var op, req any
	if opID != "" {
		op = opID
	}
	if a.RequestID != "" {
		req = a.RequestID
	}
	var d any
	if len(diff) > 0 {
		d = []byte(diff)
	}
	return []any{a.Name, a.Role, action, targetType, targetID, reason, hashOf(before), hashOf(after), d, req, op}
}

// pipe sends the statements of a transaction in as few round trips as it
// can. Writes whose results are only checked (a re-inject's projections,
// outbox message and audit row) are queued, and travel with the
// transaction's next reads (send) — in a bulk run, with the next entry's
// reads. The server runs a batch's statements one after the other, in the
// order they were queued, each seeing the ones before it, so every read
// sees every write queued before it, and the transaction commits what it
// did with one round trip per statement; only a failed write is reported
// later, by the send that carried it (and it fails the transaction as
// before). Whoever holds a pipe sends it before any statement of its own
// that must follow the queued ones (a savepoint's release, COMMIT).
type pipe struct {
	tx pgx.Tx
	b  *pgx.Batch
	// lockedStock: the transaction holds inventory row locks (a deal was
	// reinstated), which other deals' re-injects may be waiting for.
	lockedStock bool
}

func newPipe(tx pgx.Tx) *pipe { return &pipe{tx: tx, b: &pgx.Batch{}} }

// queue adds a write; a failure is reported as what: err.
func (p *pipe) queue(what, sql string, args ...any) {
	p.b.Queue(sql, args...).Fn = func(br pgx.BatchResults) error {
		if _, err := br.Exec(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
}

// send runs what is queued (writes, then reads with their callbacks) in
// one round trip, and returns the first failure.
func (p *pipe) send(ctx context.Context) error {
	if p.b.Len() == 0 {
		return nil
	}
	b := p.b
	p.b = &pgx.Batch{}
	return p.tx.SendBatch(ctx, b).Close()
}

// appendAndProject appends the changes' events in one round trip
// (AppendAllTx: it returns what the log stored) and queues their
// projections.
func (p *pipe) appendAndProject(ctx context.Context, meta domain.Metadata, changes ...domain.Change) error {
	recs, err := AppendAllTx(ctx, p.tx, meta, changes...)
	if err != nil {
		return err
	}
	for _, r := range recs {
		if err := projections.Apply(ctx, projectionQueue{p: p, r: r}, r); err != nil {
			return err
		}
	}
	return nil
}

// projectionQueue is the projections.Execer of a pipe, for event r. Every
// statement of a projection must touch exactly one row (projections' exec1
// checks the count it is given): the statement is queued, exec1 is told one
// row, and the real count is checked when the batch comes back, as a
// replay's pipelined projections do (projections/rebuild.go). Queued
// projections may run after the appends that follow them in the same
// entry: they write other rows than those, and no statement reads in
// between.
type projectionQueue struct {
	p *pipe
	r domain.RecordedEvent
}

func (q projectionQueue) Exec(_ context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	r := q.r
	q.p.b.Queue(sql, args...).Fn = func(br pgx.BatchResults) error {
		tag, err := br.Exec()
		if err == nil && tag.RowsAffected() != 1 {
			err = fmt.Errorf("expected 1 row, touched %d", tag.RowsAffected())
		}
		if err != nil {
			return fmt.Errorf("cannot project %s event %s/%d: %w", r.Event.EventType(), r.StreamID, r.StreamVersion, err)
		}
		return nil
	}
	return pgconn.NewCommandTag("UPDATE 1"), nil
}

// queuedTx is tx as outbox.PublishTx sees it: its Exec — the one statement
// the watermill publisher runs, whose result it ignores — is queued on p.
type queuedTx struct {
	pgx.Tx
	p    *pipe
	what string
}

func (t queuedTx) Exec(_ context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	t.p.queue(t.what, sql, args...)
	return pgconn.CommandTag{}, nil
}

// MarkOutboxWrite passes outbox.PublishTx's mark on to the transaction
// (the unit of work wakes the relays after it commits).
func (t queuedTx) MarkOutboxWrite() {
	if m, ok := t.Tx.(outbox.WriteMarker); ok {
		m.MarkOutboxWrite()
	}
}

// loadDeadLetterForUpdate locks the entry's row (the state guard: concurrent
// actions on one entry run one after the other) and folds its stream.
func loadDeadLetterForUpdate(ctx context.Context, tx pgx.Tx, id string) (*domain.DeadLetter, error) {
	if !validUUID(id) {
		return nil, fmt.Errorf("dead letter %q: %w", id, domain.ErrNotFound)
	}
	var one int
	err := tx.QueryRow(ctx, `SELECT 1 FROM dead_letters WHERE id=$1 FOR UPDATE`, id).Scan(&one)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("dead letter %s: %w", id, domain.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("cannot lock dead letter %s: %w", id, err)
	}
	recs, err := LoadStream(ctx, tx, domain.DeadLetterStream(id))
	if err != nil {
		return nil, err
	}
	evs := make([]domain.Event, len(recs))
	for i, r := range recs {
		evs[i] = r.Event
	}
	return domain.RehydrateDeadLetter(evs)
}

// MakerChecker reports whether money edits need a second operator.
func (s *Store) MakerChecker(ctx context.Context) (bool, error) {
	var v string
	err := s.pool.QueryRow(ctx, `SELECT value FROM settings WHERE key='maker_checker'`).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("cannot read settings: %w", err)
	}
	return v == "true", nil
}

// SetMakerChecker turns the maker-checker rule on or off for every process.
func (s *Store) SetMakerChecker(ctx context.Context, on bool) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO settings (key, value) VALUES ('maker_checker', $1)
		ON CONFLICT (key) DO UPDATE SET value=EXCLUDED.value`, strconv.FormatBool(on))
	if err != nil {
		return fmt.Errorf("cannot write settings: %w", err)
	}
	return nil
}

// ValidatePayload checks a payload against the schema of its topic; errors
// are *domain.ValidationError naming the field.
func ValidatePayload(topic string, payload []byte) (domain.InvoiceRequest, error) {
	var req domain.InvoiceRequest
	if topic != outbox.InvoiceTopic {
		return req, &domain.ValidationError{Field: "topic", Reason: fmt.Sprintf("messages of topic %q cannot be edited or re-injected; discard them", topic)}
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			field := te.Field
			if field == "" {
				field = "payload" // the document itself is not an object
			}
			return req, &domain.ValidationError{Field: field, Reason: "has the wrong type: " + err.Error()}
		}
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return req, &domain.ValidationError{Field: strings.Trim(f, `"`), Reason: "is not a field of an invoice request"}
		}
		return req, &domain.ValidationError{Field: "payload", Reason: err.Error()}
	}
	if dec.More() {
		return req, &domain.ValidationError{Field: "payload", Reason: "must hold exactly one JSON object"}
	}
	return req, domain.ValidateInvoiceRequest(req)
}

// EditDeadLetter stores payload as a new revision of the entry, validated
// against its topic's schema, with a reason; the edit and its audit row
// commit together.
func (s *Store) EditDeadLetter(ctx context.Context, id string, payload []byte, reason string, a Actor) (domain.Revision, error) {
	mc, err := s.MakerChecker(ctx)
	if err != nil {
		return domain.Revision{}, err
	}
	var rev domain.Revision
	err = s.unit(ctx, func(tx pgx.Tx) error {
		dl, err := loadDeadLetterForUpdate(ctx, tx, id)
		if err != nil {
			return err
		}
		before := dl.Latest().Payload
		change, err := dl.Edit(payload, reason, a.Name, mc, func(p []byte) error {
			req, err := ValidatePayload(dl.Topic, p)
			if err != nil {
				return err
			}
			// The saga identity cannot be edited: it ties the entry to its deal.
			if dl.DealID != "" && req.DealID != dl.DealID {
				return &domain.ValidationError{Field: "deal_id", Reason: "cannot be changed (it is " + dl.DealID + ")"}
			}
			// The payload keeps the key it failed with; after a re-inject
			// under a new key the entry's key is derived from it.
			if dl.Key != "" && req.IdempotencyKey != dl.Key && !strings.HasPrefix(dl.Key, req.IdempotencyKey+":r") {
				return &domain.ValidationError{Field: "idempotency_key", Reason: "cannot be changed; re-inject with a new key instead"}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if _, err := appendAndProject(ctx, tx, a.meta(), change); err != nil {
			return err
		}
		ev := change.Events[0].(domain.DeadLetterEdited)
		rev = domain.Revision{Number: ev.Revision, Payload: ev.Payload, Patch: ev.Patch, Reason: ev.Reason, Actor: ev.Actor,
			MoneyChanged: ev.MoneyChanged, NeedsApproval: ev.NeedsApproval}
		return auditTx(ctx, tx, a, "dead_letter.edit", "dead_letter", id, reason, before, ev.Payload, ev.Patch, "")
	})
	if err != nil {
		return domain.Revision{}, fmt.Errorf("cannot edit dead letter %s: %w", id, err)
	}
	return rev, nil
}

// ApproveDeadLetter approves the latest revision (maker-checker).
func (s *Store) ApproveDeadLetter(ctx context.Context, id string, a Actor) error {
	err := s.unit(ctx, func(tx pgx.Tx) error {
		dl, err := loadDeadLetterForUpdate(ctx, tx, id)
		if err != nil {
			return err
		}
		change, err := dl.Approve(a.Name)
		if err != nil {
			return err
		}
		if _, err := appendAndProject(ctx, tx, a.meta(), change); err != nil {
			return err
		}
		p := dl.Latest().Payload
		return auditTx(ctx, tx, a, "dead_letter.approve", "dead_letter", id, fmt.Sprintf("revision %d", dl.Latest().Number), p, p, nil, "")
	})
	if err != nil {
		return fmt.Errorf("cannot approve dead letter %s: %w", id, err)
	}
	return nil
}

// DiscardDeadLetter gives up on an entry, with a reason.
func (s *Store) DiscardDeadLetter(ctx context.Context, id, reason string, a Actor) error {
	err := s.unit(ctx, func(tx pgx.Tx) error {
		dl, err := loadDeadLetterForUpdate(ctx, tx, id)
		if err != nil {
			return err
		}
		change, err := dl.Discard(a.Name, reason)
		if err != nil {
			return err
		}
		if _, err := appendAndProject(ctx, tx, a.meta(), change); err != nil {
			return err
		}
		return auditTx(ctx, tx, a, "dead_letter.discard", "dead_letter", id, reason, dl.Latest().Payload, nil, nil, "")
	})
	if err != nil {
		return fmt.Errorf("cannot discard dead letter %s: %w", id, err)
	}
	return nil
}

// ReinjectOptions configures a re-inject.
type ReinjectOptions struct {
	Reason string
	// NewKey re-injects under a new idempotency key (recorded); by default
	// the saga resumes with the same K.
	NewKey bool
	// OperationID ties the action to a bulk operation.
	OperationID string
	// MaxReinjects is the loop guard; 0 means DefaultMaxReinjects.
	MaxReinjects int
}

// ReinjectResult says what a re-inject did.
type ReinjectResult struct {
	DeadLetterID   string `json:"dead_letter_id"`
	DealID         string `json:"deal_id"`
	IdempotencyKey string `json:"idempotency_key"`
	NewKey         bool   `json:"new_key"`
	Revision       int    `json:"revision"`
	Count          int    `json:"count"`
	MessageUUID    string `json:"message_uuid"`
}

// ReinjectDeadLetter republishes the entry's latest revision through the
// outbox in ONE transaction: the state guard (only an open entry can be
// re-injected, under a row lock, so of two concurrent re-injects one wins
// and the other gets domain.ErrStateConflict), the deal reinstated from
// reverted to won with its inventory allocated again, the saga resumed with
// a fresh retry budget, the outbox message, and the audit row.
func (s *Store) ReinjectDeadLetter(ctx context.Context, id string, opt ReinjectOptions, a Actor) (ReinjectResult, error) {
	var res ReinjectResult
	err := s.unit(ctx, func(tx pgx.Tx) error {
		p := newPipe(tx)
		var err error
		if res, err = s.reinjectTx(ctx, p, id, opt, a); err != nil {
			return err
		}
		return p.send(ctx)
	})
	var se *domain.StateError
	if errors.As(err, &se) {
		return ReinjectResult{}, err // already names the entry and the action
	}
	if err != nil {
		return ReinjectResult{}, fmt.Errorf("cannot re-inject dead letter %s: %w", id, err)
	}
	return res, nil
}

// reinjectTx re-injects entry id in p's transaction. Its reads go in one
// round trip, together with the writes still queued on p: the row lock on
// the entry (the state guard), then — each statement after the lock, so
// that it sees what the lock waited for — the entry's stream, and its deal,
// locked only when the entry is open (as the checks below would lock it).
// The outbox message and the audit row are left queued on p: the caller
// sends them.
func (s *Store) reinjectTx(ctx context.Context, p *pipe, id string, opt ReinjectOptions, a Actor) (ReinjectResult, error) {
	if !validUUID(id) {
		return ReinjectResult{}, fmt.Errorf("dead letter %q: %w", id, domain.ErrNotFound)
	}
	var rd reinjectRead
	// A callback's error would make pgx forget the batch's prepared
	// statements: an entry that is not there is reported after the batch.
	p.b.Queue(`SELECT 1 FROM dead_letters WHERE id=$1 FOR UPDATE`, id).QueryRow(func(row pgx.Row) error {
		var one int
		err := row.Scan(&one)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("cannot lock dead letter %s: %w", id, err)
		}
		rd.found = true
		return nil
	})
	p.b.Queue(`SELECT type, schema_version, payload FROM events WHERE stream_id=$1 ORDER BY stream_version`,
		domain.DeadLetterStream(id)).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var (
				typ     string
				sv      int
				payload []byte
			)
			if err := rows.Scan(&typ, &sv, &payload); err != nil {
				return fmt.Errorf("cannot read event: %w", err)
			}
			e, err := domain.DecodeEvent(typ, sv, payload)
			if err != nil {
				return fmt.Errorf("event %d of %s: %w", len(rd.evs)+1, domain.DeadLetterStream(id), err)
			}
			rd.evs = append(rd.evs, e)
		}
		return rows.Err()
	})
	p.b.Queue(dealColumns+` WHERE id=(SELECT deal_id FROM dead_letters WHERE id=$1 AND state='open') FOR UPDATE`, id).
		QueryRow(func(row pgx.Row) error {
			// Any failure to read it here is met again, and reported, by
			// loadDealForUpdate in planReinject.
			if d, err := scanDeal(row); err == nil {
				rd.deal = d
			}
			return nil
		})
	if err := p.send(ctx); err != nil {
		return ReinjectResult{}, err
	}
	plan, err := planReinject(ctx, p, id, opt, a, rd)
	if err != nil {
		return ReinjectResult{}, err
	}
	if err := p.appendAndProject(ctx, a.meta(), plan.changes...); err != nil {
		return ReinjectResult{}, err
	}
	return plan.finish(ctx, p, opt, a)
}

// reinjectRead is what a re-inject of one entry read under its locks.
type reinjectRead struct {
	found bool           // the entry's row is there (and locked)
	evs   []domain.Event // the entry's stream
	deal  *domain.Deal   // the entry's deal, locked; nil when not read
	// held: the inventory rows and saga of the deal, locked when it was read
	// (a bulk batch reads them ahead for its reverted deals); nil: lock
	// them when the deal is reinstated.
	held *heldLocks
	// aheadOnly: deal and held are all the re-inject may read; a deal not
	// read ahead fails it with errNotReadAhead (the database does not hold
	// the batch's earlier changes yet).
	aheadOnly bool
}

// errNotReadAhead: the re-inject needs a deal that was not read ahead.
var errNotReadAhead = errors.New("the deal was not read ahead")

// heldLocks are inventory rows and sagas a transaction locked ahead.
type heldLocks struct {
	stock map[string]domain.Stock // by SKU; a SKU without a row is absent (zero stock)
	sagas map[string]int          // saga version by key; absent: no saga row
}

// reinjectPlan is a re-inject decided but not yet written: its changes,
// then (finish) the outbox message and the audit row.
type reinjectPlan struct {
	id      string
	dl      *domain.DeadLetter
	rev     domain.Revision
	req     domain.InvoiceRequest
	key     string
	change  domain.Change   // the entry's own
	changes []domain.Change // change, then the deal's, its inventory's and saga's when reinstated
	// reinstated: the deal was reinstated (its inventory rows are locked).
	reinstated bool
	// deal: the deal as read, before the changes.
	deal *domain.Deal
}

// planReinject checks what rd read and decides the re-inject of entry id:
// the state guard, the revision's validity, the deal's state. Reads it
// still needs (a deal not read ahead, the locks of a reinstate not held
// yet) go through p, each in one round trip.
func planReinject(ctx context.Context, p *pipe, id string, opt ReinjectOptions, a Actor, rd reinjectRead) (reinjectPlan, error) {
	if !rd.found {
		return reinjectPlan{}, fmt.Errorf("dead letter %s: %w", id, domain.ErrNotFound)
	}
	dl, err := domain.RehydrateDeadLetter(rd.evs)
	if err != nil {
		return reinjectPlan{}, err
	}
	if dl.State != domain.DLStateOpen {
		return reinjectPlan{}, &domain.StateError{ID: id, State: dl.State, Action: "re-inject", Err: domain.ErrStateConflict}
	}
	if !reinjectableTopics[dl.Topic] {
		return reinjectPlan{}, &domain.ValidationError{Field: "topic",
			Reason: fmt.Sprintf("messages of topic %q cannot be re-injected; discard them", dl.Topic)}
	}
	rev := dl.Latest()
	req, err := ValidatePayload(dl.Topic, rev.Payload)
	if err != nil {
		return reinjectPlan{}, fmt.Errorf("revision %d is not valid; edit it first: %w", rev.Number, err)
	}
	// The same K is the entry's current key: after a re-inject under a new
	// key it is that key (derived from the one in the payload), whose saga
	// and deal close the entry now belongs to.
	if dl.Key != req.IdempotencyKey && strings.HasPrefix(dl.Key, req.IdempotencyKey+":r") {
		req.IdempotencyKey = dl.Key
	}
	d, held := rd.deal, rd.held
	if d == nil || d.ID() != req.DealID {
		// Not read ahead: the entry has no deal of its own (a poison
		// message's), or the deal could not be read.
		if rd.aheadOnly {
			return reinjectPlan{}, errNotReadAhead
		}
		if d, err = loadDealForUpdate(ctx, p.tx, req.DealID); err != nil {
			return reinjectPlan{}, fmt.Errorf("deal %s: %w", req.DealID, err)
		}
		held = nil
	}
	key := req.IdempotencyKey
	if opt.NewKey {
		key = fmt.Sprintf("%s:r%d", domain.IdempotencyKey(req.DealID, req.CloseVersion), dl.Reinjects+1)
	}
	maxRe := opt.MaxReinjects
	if maxRe == 0 {
		maxRe = DefaultMaxReinjects
	}
	change, err := dl.Reinject(a.Name, opt.Reason, key, opt.NewKey, opt.OperationID, maxRe)
	if err != nil {
		return reinjectPlan{}, err
	}
	plan := reinjectPlan{id: id, dl: dl, rev: rev, req: req, key: key, change: change, changes: []domain.Change{change}, deal: d}
	switch {
	case d.Status() == domain.StatusReverted && d.InvoiceKey() == req.IdempotencyKey:
		stock := map[string]domain.Stock{}
		var sagaVersion int
		p.lockedStock, plan.reinstated = true, true
		if held != nil {
			// Locked ahead, with the deal.
			for _, q := range d.Quantities() {
				st, ok := held.stock[q.SKU]
				if !ok {
					st = domain.Stock{SKU: q.SKU}
				}
				stock[q.SKU] = st
			}
			if !opt.NewKey {
				sagaVersion = held.sagas[key]
			}
		} else {
			// The deal's inventory rows (in lockStock's order), then its
			// saga, locked in one round trip: another worker reinstating a
			// deal of the same SKUs waits for them until this transaction
			// commits.
			for _, q := range d.Quantities() {
				sku := q.SKU
				p.b.Queue(`SELECT available, version FROM inventory WHERE sku=$1 FOR UPDATE`, sku).QueryRow(func(row pgx.Row) error {
					st := domain.Stock{SKU: sku}
					if err := row.Scan(&st.Available, &st.Version); err != nil && !errors.Is(err, pgx.ErrNoRows) {
						return fmt.Errorf("cannot lock inventory %s: %w", sku, err)
					}
					stock[sku] = st
					return nil
				})
			}
			if !opt.NewKey {
				p.b.Queue(`SELECT version FROM invoice_sagas WHERE idempotency_key=$1 FOR UPDATE`, key).QueryRow(func(row pgx.Row) error {
					if err := row.Scan(&sagaVersion); err != nil && !errors.Is(err, pgx.ErrNoRows) {
						return fmt.Errorf("cannot lock saga %s: %w", key, err)
					}
					return nil
				})
			}
			if err := p.send(ctx); err != nil {
				return reinjectPlan{}, err
			}
		}
		reinstate, err := d.Reinstate(key, opt.Reason, stock)
		if err != nil {
			return reinjectPlan{}, err
		}
		plan.changes = append(plan.changes, reinstate...)
		plan.changes = append(plan.changes, domain.Change{StreamID: domain.SagaStream(key), ExpectedVersion: sagaVersion,
			Events: []domain.Event{domain.InvoiceSagaResumed{DealID: req.DealID, IdempotencyKey: key, DeadLetterID: id, OperationID: opt.OperationID}}})
	case d.Status() == domain.StatusWon && d.InvoiceKey() == req.IdempotencyKey && !opt.NewKey:
		// The saga never ended (a poison copy of its message, say): the
		// fixed message simply joins it.
	default:
		return reinjectPlan{}, &domain.StateError{ID: id, State: "for a deal that is " + string(d.Status()) +
			" (key " + d.InvoiceKey() + ")", Action: "re-inject", Err: domain.ErrStateConflict}
	}
	return plan, nil
}

// finish queues the re-inject's outbox message and audit row on p, once
// its changes are appended (or queued to be).
func (plan reinjectPlan) finish(ctx context.Context, p *pipe, opt ReinjectOptions, a Actor) (ReinjectResult, error) {
	id, req, key := plan.id, plan.req, plan.key
	req.IdempotencyKey = key
	payload, err := json.Marshal(req)
	if err != nil {
		return ReinjectResult{}, fmt.Errorf("cannot encode invoice request: %w", err)
	}
	m := message.NewMessage(watermill.NewUUID(), payload)
	m.Metadata.Set(outbox.MetadataType, outbox.TypeInvoiceRequest)
	m.Metadata.Set(outbox.MetadataSchemaVersion, "1")
	m.Metadata.Set(outbox.MetadataIdempotencyKey, key)
	m.Metadata.Set(outbox.MetadataReinjectedFrom, id)
	if a.RequestID != "" {
		m.Metadata.Set(outbox.MetadataCorrelationID, a.RequestID)
	}
	queue.SetOrderingKey(m, req.DealID)
	qtx := queuedTx{Tx: p.tx, p: p, what: fmt.Sprintf("cannot write the outbox message of dead letter %s", id)}
	if err := outbox.PublishTx(ctx, qtx, plan.dl.Topic, m); err != nil {
		return ReinjectResult{}, err
	}
	ev := plan.change.Events[0].(domain.DeadLetterReinjected)
	reason := opt.Reason
	if opt.NewKey {
		reason += " (new idempotency key " + key + ")"
	}
	p.queue("cannot write audit log", auditSQL,
		auditArgs(a, "dead_letter.reinject", "dead_letter", id, reason, plan.rev.Payload, payload, nil, opt.OperationID)...)
	return ReinjectResult{DeadLetterID: id, DealID: req.DealID, IdempotencyKey: key, NewKey: opt.NewKey,
		Revision: plan.rev.Number, Count: ev.Count, MessageUUID: m.UUID}, nil
}

// dealColumns selects what scanDeal reads, as loadDealForUpdate does.
const dealColumns = `SELECT id::text, customer_id, customer_name, currency, lines, total, status, version,
			close_version, status_before_close, idempotency_key, invoice_number
		FROM deals`

// scanDeal reads a deal selected with dealColumns (pgx.ErrNoRows when
// there is none).
func scanDeal(row pgx.Row) (*domain.Deal, error) {
	var (
		s            domain.DealSnapshot
		lines        []byte
		closeVersion *int
		prev, key    *string
		invNo        *string
	)
	if err := row.Scan(&s.ID, &s.Customer.ID, &s.Customer.Name, &s.Currency, &lines,
		&s.Total, &s.Status, &s.Version, &closeVersion, &prev, &key, &invNo); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(lines, &s.Lines); err != nil {
		return nil, fmt.Errorf("deal %s lines: %w", s.ID, err)
	}
	if closeVersion != nil {
		s.CloseVersion = *closeVersion
	}
	if prev != nil {
		s.PreviousStatus = domain.Status(*prev)
	}
	if key != nil {
		s.IdempotencyKey = *key
	}
	if invNo != nil {
		s.InvoiceNumber = *invNo
	}
	return domain.UnmarshalDealFromDatabase(s)
}

func resolveAlertsTx(ctx context.Context, tx pgx.Tx, where, arg, reason string, meta domain.Metadata) error {
	rows, err := tx.Query(ctx, `SELECT id::text, version FROM alerts WHERE state <> 'resolved' AND `+where+` FOR UPDATE`, arg)
	if err != nil {
		return fmt.Errorf("cannot find alerts: %w", err)
	}
	type av struct {
		id string
		v  int
	}
	as, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (av, error) {
		var x av
		return x, r.Scan(&x.id, &x.v)
	})
	if err != nil {
		return fmt.Errorf("cannot read alerts: %w", err)
	}
	for _, x := range as {
		if _, err := appendAndProject(ctx, tx, meta, domain.Change{StreamID: domain.AlertStream(x.id), ExpectedVersion: x.v,
			Events: []domain.Event{domain.AlertResolved{AlertID: x.id, Actor: meta.Actor, Reason: reason}}}); err != nil {
			return err
		}
	}
	return nil
}

// AcknowledgeAlert marks an open alert as seen.
func (s *Store) AcknowledgeAlert(ctx context.Context, id string, a Actor) error {
	return s.alertAction(ctx, id, a, "alert.acknowledge", "", func(state string, v int) (domain.Change, error) {
		if state != "open" {
			return domain.Change{}, &domain.StateError{ID: id, State: state, Action: "acknowledge", Err: domain.ErrStateConflict}
		}
		return domain.Change{StreamID: domain.AlertStream(id), ExpectedVersion: v,
			Events: []domain.Event{domain.AlertAcknowledged{AlertID: id, Actor: a.Name}}}, nil
	})
}

// ResolveAlert closes an alert, with a reason.
func (s *Store) ResolveAlert(ctx context.Context, id, reason string, a Actor) error {
	if strings.TrimSpace(reason) == "" {
		return &domain.ValidationError{Field: "reason", Reason: "is required"}
	}
	return s.alertAction(ctx, id, a, "alert.resolve", reason, func(state string, v int) (domain.Change, error) {
		if state == "resolved" {
			return domain.Change{}, &domain.StateError{ID: id, State: state, Action: "resolve", Err: domain.ErrStateConflict}
		}
		return domain.Change{StreamID: domain.AlertStream(id), ExpectedVersion: v,
			Events: []domain.Event{domain.AlertResolved{AlertID: id, Actor: a.Name, Reason: reason}}}, nil
	})
}

func (s *Store) alertAction(ctx context.Context, id string, a Actor, action, reason string, fn func(state string, v int) (domain.Change, error)) error {
	if !validUUID(id) {
		return fmt.Errorf("alert %q: %w", id, domain.ErrNotFound)
	}
	return s.unit(ctx, func(tx pgx.Tx) error {
		var (
			state string
			v     int
		)
		err := tx.QueryRow(ctx, `SELECT state, version FROM alerts WHERE id=$1 FOR UPDATE`, id).Scan(&state, &v)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("alert %s: %w", id, domain.ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("cannot lock alert %s: %w", id, err)
		}
		change, err := fn(state, v)
		if err != nil {
			return err
		}
		if _, err := appendAndProject(ctx, tx, a.meta(), change); err != nil {
			return err
		}
		return auditTx(ctx, tx, a, action, "alert", id, reason, []byte(state), []byte(change.Events[0].EventType()), nil, "")
	})
}
