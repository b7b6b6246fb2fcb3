package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
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
	CreatedAt      time.Time         `json:"created_at"`
	UpdatedAt      time.Time         `json:"updated_at"`
}

// ListDeadLetters returns dead letters, newest first; state "" means any.
func (s *Store) ListDeadLetters(ctx context.Context, state string, limit int) ([]DeadLetterView, error) {
	rows, err := s.pool.Query(ctx, `SELECT id::text, state, deal_id::text, idempotency_key, message_uuid, topic, handler, payload, metadata,
			reason, error_class, attempts, first_failure_at, last_failure_at, created_at, updated_at
		FROM dead_letters WHERE ($1 = '' OR state = $1) ORDER BY created_at DESC, id LIMIT $2`, state, limit)
	if err != nil {
		return nil, fmt.Errorf("cannot list dead letters: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (DeadLetterView, error) {
		var (
			d       DeadLetterView
			payload []byte
		)
		err := r.Scan(&d.ID, &d.State, &d.DealID, &d.IdempotencyKey, &d.MessageUUID, &d.Topic, &d.Handler, &payload, &d.Metadata,
			&d.Reason, &d.ErrorClass, &d.Attempts, &d.FirstFailureAt, &d.LastFailureAt, &d.CreatedAt, &d.UpdatedAt)
		if json.Valid(payload) {
			d.Payload = payload
		} else {
			t := string(payload)
			d.PayloadText = &t
		}
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("cannot list dead letters: %w", err)
	}
	if out == nil {
		out = []DeadLetterView{}
	}
	return out, nil
}
