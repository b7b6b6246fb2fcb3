package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/domain"
)

// RaiseAlertOnce raises alert unless an alert of the same kind for the same
// idempotency key exists already (in any state): one incident, one alert,
// however often a redelivery finds it again. It returns the alert's id and
// whether this call raised it. alert.IdempotencyKey must be set.
func (s *Store) RaiseAlertOnce(ctx context.Context, alert domain.AlertRaised, meta domain.Metadata) (string, bool, error) {
	if alert.IdempotencyKey == "" {
		return "", false, errors.New("cannot raise an alert once: no idempotency key")
	}
	if alert.AlertID == "" {
		alert.AlertID = watermill.NewUUID()
	}
	if !validUUID(alert.DealID) {
		alert.DealID = ""
	}
	id, raised := alert.AlertID, false
	err := s.unit(ctx, func(tx pgx.Tx) error {
		// Concurrent deliveries of one key serialize here, so the check
		// below cannot race.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`,
			"alert:"+alert.Kind+":"+alert.IdempotencyKey); err != nil {
			return fmt.Errorf("cannot lock alert %s of %s: %w", alert.Kind, alert.IdempotencyKey, err)
		}
		err := tx.QueryRow(ctx, `SELECT id::text FROM alerts WHERE kind=$1 AND idempotency_key=$2 ORDER BY created_at LIMIT 1`,
			alert.Kind, alert.IdempotencyKey).Scan(&id)
		if err == nil {
			return nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("cannot look for alert %s of %s: %w", alert.Kind, alert.IdempotencyKey, err)
		}
		id, raised = alert.AlertID, true
		if _, err := appendAndProject(ctx, tx, meta,
			domain.Change{StreamID: domain.AlertStream(alert.AlertID), Events: []domain.Event{alert}}); err != nil {
			return err
		}
		return s.notifyAlert(ctx, tx, alert, meta)
	})
	if err != nil {
		return "", false, fmt.Errorf("cannot raise alert: %w", err)
	}
	return id, raised, nil
}
