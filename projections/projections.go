// Package projections keeps dealbridge's read models (deals, inventory,
// invoice sagas) as pure functions of the event log.
//
// Apply runs in the same transaction as the append of the events it
// applies, so a read model is never ahead of or behind the log. Every value
// it writes comes from the events themselves (timestamps included), so
// replaying the log into empty tables reproduces the live tables exactly.
package projections

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dealbridge/dealbridge/domain"
)

// Execer is the part of pgx.Tx that projections need.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Apply folds recorded events into the read models through tx.
func Apply(ctx context.Context, tx Execer, recs ...domain.RecordedEvent) error {
	for _, r := range recs {
		if err := apply(ctx, tx, r); err != nil {
			return fmt.Errorf("cannot project %s event %s/%d: %w", r.Event.EventType(), r.StreamID, r.StreamVersion, err)
		}
	}
	return nil
}

// ApplyPipelined is Apply with the statements pipelined: they are sent
// together and run in order, in one round trip for the usual events (a
// statement whose result Apply needs at once flushes the queue first). A
// statement that fails or does not touch exactly one row fails the call;
// tx is then aborted and the caller must roll back.
func ApplyPipelined(ctx context.Context, tx pgx.Tx, recs ...domain.RecordedEvent) error {
	return ApplyPipelinedWith(ctx, tx, nil, recs...)
}

// ApplyPipelinedWith is ApplyPipelined that also sends the statements
// queued in also, after the projection statements and in the same round
// trip; their own callbacks run, and the first error of either fails the
// call.
func ApplyPipelinedWith(ctx context.Context, tx pgx.Tx, also *pgx.Batch, recs ...domain.RecordedEvent) error {
	x := &batchExecer{}
	x.reset(tx)
	for _, r := range recs {
		x.cur = r
		if err := Apply(ctx, x, r); err != nil {
			return err
		}
	}
	if also != nil {
		x.b.QueuedQueries = append(x.b.QueuedQueries, also.QueuedQueries...)
	}
	return x.flush(ctx)
}

func apply(ctx context.Context, tx Execer, r domain.RecordedEvent) error {
	at := r.RecordedAt
	switch e := r.Event.(type) {
	case domain.DealCreated:
		lines, err := json.Marshal(e.Lines)
		if err != nil {
			return err
		}
		return exec1(ctx, tx, `INSERT INTO deals (id, customer_id, customer_name, currency, lines, total, status, version, created_at, updated_at)
			VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$9)`,
			e.DealID, e.Customer.ID, e.Customer.Name, e.Currency, lines, e.Total, domain.StatusOpen, r.StreamVersion, at)
	case domain.DealWon:
		if err := exec1(ctx, tx, `UPDATE deals SET status=$2, version=$3, close_version=$4, status_before_close=$5,
			idempotency_key=$6, invoice_number=NULL, updated_at=$7 WHERE id=$1`,
			e.DealID, domain.StatusWon, r.StreamVersion, e.CloseVersion, e.PreviousStatus, e.IdempotencyKey, at); err != nil {
			return err
		}
		return exec1(ctx, tx, `INSERT INTO invoice_sagas (idempotency_key, deal_id, state, started_at, updated_at)
			VALUES ($1,$2,'pending',$3,$3)`, e.IdempotencyKey, e.DealID, at)
	case domain.DealLost:
		return exec1(ctx, tx, `UPDATE deals SET status=$2, version=$3, status_before_close=$4, updated_at=$5 WHERE id=$1`,
			e.DealID, domain.StatusLost, r.StreamVersion, e.PreviousStatus, at)
	case domain.InvoiceCreated:
		if err := exec1(ctx, tx, `UPDATE deals SET status=$2, version=$3, invoice_number=$4, updated_at=$5 WHERE id=$1`,
			e.DealID, domain.StatusInvoiced, r.StreamVersion, e.InvoiceNumber, at); err != nil {
			return err
		}
		return exec1(ctx, tx, `UPDATE invoice_sagas SET state='invoiced', invoice_number=$2, next_attempt_at=NULL, updated_at=$3 WHERE idempotency_key=$1`,
			e.IdempotencyKey, e.InvoiceNumber, at)
	case domain.InvoiceAttemptFailed:
		var next any = e.NextAttemptAt
		if e.Final {
			next = nil // InvoiceFailed follows in the same transaction
		}
		return exec1(ctx, tx, `UPDATE invoice_sagas SET state='retrying', version=$2, attempts=$3, error_class=$4, last_error=$5,
			first_attempt_at=coalesce(first_attempt_at, $6), last_attempt_at=$6, next_attempt_at=$7, updated_at=$8
			WHERE idempotency_key=$1`,
			e.IdempotencyKey, r.StreamVersion, e.Attempt, e.ErrorClass, e.Message, e.AttemptedAt, next, at)
	case domain.InvoiceFailed:
		return exec1(ctx, tx, `UPDATE invoice_sagas SET state='failed', version=$2, attempts=$3, error_class=$4, last_error=$5,
			next_attempt_at=NULL, updated_at=$6 WHERE idempotency_key=$1`,
			e.IdempotencyKey, r.StreamVersion, e.Attempts, e.ErrorClass, e.Reason, at)
	case domain.DealReverted:
		if err := exec1(ctx, tx, `UPDATE deals SET status=$2, version=$3, updated_at=$4 WHERE id=$1`,
			e.DealID, domain.StatusReverted, r.StreamVersion, at); err != nil {
			return err
		}
		return exec1(ctx, tx, `UPDATE invoice_sagas SET state='compensated', updated_at=$2 WHERE idempotency_key=$1`,
			e.IdempotencyKey, at)
	case domain.AlertRaised:
		return exec1(ctx, tx, `INSERT INTO alerts (id, kind, severity, state, deal_id, idempotency_key, dead_letter_id, message, version, created_at, updated_at)
			VALUES ($1,$2,$3,'open',$4,$5,$6,$7,$8,$9,$9)`,
			e.AlertID, e.Kind, e.Severity, nullUUID(e.DealID), nullText(e.IdempotencyKey), nullUUID(e.DeadLetterID), e.Message, r.StreamVersion, at)
	case domain.MessageDeadLettered:
		md, err := json.Marshal(e.Metadata)
		if err != nil {
			return err
		}
		return exec1(ctx, tx, `INSERT INTO dead_letters (id, state, deal_id, idempotency_key, message_uuid, topic, handler, payload, metadata,
				reason, error_class, attempts, first_failure_at, last_failure_at, version, created_at, updated_at)
			VALUES ($1,'open',$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$15)`,
			e.DeadLetterID, nullUUID(e.DealID), nullText(e.IdempotencyKey), e.MessageUUID, e.Topic, e.Handler, e.RawPayload(), md,
			e.Reason, e.ErrorClass, e.Attempts, e.FirstFailureAt, e.LastFailureAt, r.StreamVersion, at)
	case domain.InventorySet:
		return exec1(ctx, tx, `INSERT INTO inventory (sku, available, allocated, version, updated_at) VALUES ($1,$2,0,$3,$4)
			ON CONFLICT (sku) DO UPDATE SET available=EXCLUDED.available, version=EXCLUDED.version, updated_at=EXCLUDED.updated_at`,
			e.SKU, e.Available, r.StreamVersion, at)
	case domain.InventoryAllocated:
		return exec1(ctx, tx, `UPDATE inventory SET available=available-$2, allocated=allocated+$2, version=$3, updated_at=$4 WHERE sku=$1`,
			e.SKU, e.Quantity, r.StreamVersion, at)
	case domain.InventoryReleased:
		return exec1(ctx, tx, `UPDATE inventory SET available=available+$2, allocated=allocated-$2, version=$3, updated_at=$4 WHERE sku=$1`,
			e.SKU, e.Quantity, r.StreamVersion, at)
	case domain.DeadLetterEdited:
		return exec1(ctx, tx, `UPDATE dead_letters SET payload=$2, revision=$3, needs_approval=$4, approved_by=NULL, version=$5, updated_at=$6
			WHERE id=$1`, e.DeadLetterID, []byte(e.Payload), e.Revision, e.NeedsApproval, r.StreamVersion, at)
	case domain.DeadLetterApproved:
		return exec1(ctx, tx, `UPDATE dead_letters SET approved_by=$2, version=$3, updated_at=$4 WHERE id=$1`,
			e.DeadLetterID, e.Actor, r.StreamVersion, at)
	case domain.DeadLetterReinjected:
		return exec1(ctx, tx, `UPDATE dead_letters SET state='reinjected', reinjects=$2, idempotency_key=coalesce($3, idempotency_key),
			version=$4, updated_at=$5 WHERE id=$1`, e.DeadLetterID, e.Count, nullText(e.IdempotencyKey), r.StreamVersion, at)
	case domain.DeadLetterDiscarded:
		return exec1(ctx, tx, `UPDATE dead_letters SET state='discarded', version=$2, updated_at=$3 WHERE id=$1`,
			e.DeadLetterID, r.StreamVersion, at)
	case domain.DeadLetterResolved:
		return exec1(ctx, tx, `UPDATE dead_letters SET state='resolved', version=$2, updated_at=$3 WHERE id=$1`,
			e.DeadLetterID, r.StreamVersion, at)
	case domain.DeadLetterReopened:
		return exec1(ctx, tx, `UPDATE dead_letters SET state='open', reason=$2, error_class=$3, attempts=attempts+$4, last_failure_at=$5,
			version=$6, updated_at=$7 WHERE id=$1`, e.DeadLetterID, e.Reason, e.ErrorClass, e.Attempts, e.LastFailureAt, r.StreamVersion, at)
	case domain.AlertAcknowledged:
		return exec1(ctx, tx, `UPDATE alerts SET state='acknowledged', version=$2, updated_at=$3 WHERE id=$1`, e.AlertID, r.StreamVersion, at)
	case domain.AlertResolved:
		return exec1(ctx, tx, `UPDATE alerts SET state='resolved', version=$2, updated_at=$3 WHERE id=$1`, e.AlertID, r.StreamVersion, at)
	case domain.DealReinstated:
		return exec1(ctx, tx, `UPDATE deals SET status=$2, version=$3, idempotency_key=$4, invoice_number=NULL, updated_at=$5 WHERE id=$1`,
			e.DealID, domain.StatusWon, r.StreamVersion, e.IdempotencyKey, at)
	case domain.InvoiceSagaResumed:
		return exec1(ctx, tx, `INSERT INTO invoice_sagas (idempotency_key, deal_id, state, version, attempts, started_at, updated_at)
			VALUES ($1,$2,'pending',$3,0,$4,$4)
			ON CONFLICT (idempotency_key) DO UPDATE SET state='pending', version=EXCLUDED.version, attempts=0, error_class=NULL,
				last_error=NULL, first_attempt_at=NULL, last_attempt_at=NULL, next_attempt_at=NULL, invoice_number=NULL, updated_at=EXCLUDED.updated_at`,
			e.IdempotencyKey, e.DealID, r.StreamVersion, at)
	default:
		return fmt.Errorf("no projection for event type %s", r.Event.EventType())
	}
}

// exec1 runs a statement that must touch exactly one row: a projection that
// silently updates nothing would let the read model drift from the log.
func exec1(ctx context.Context, tx Execer, sql string, args ...any) error {
	if q, ok := tx.(queuer); ok {
		// A replay pipelines the statement and checks the count when the
		// batch returns (rebuild.go).
		return q.queue1(sql, args)
	}
	tag, err := tx.Exec(ctx, sql, args...)
	if err != nil {
		return err
	}
	if tag.RowsAffected() != 1 {
		return fmt.Errorf("expected 1 row, touched %d", tag.RowsAffected())
	}
	return nil
}

// nullUUID and nullText store "" as NULL.
func nullUUID(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func nullText(s string) any { return nullUUID(s) }
