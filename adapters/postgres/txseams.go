package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/domain"
)

// Transaction seams: small, additive entry points that let code outside
// this package take part in a Store's units of work with its own writes.
// The benchmark (cmd/internal/bench) uses them to run the same close and
// record transactions over another job queue (River) for comparison; the
// service itself never sets them.

// InvoicePublisher writes the invoice request of a deal just won, inside
// the close transaction tx, after the deal, inventory and event writes. A
// non-nil error rolls the whole close back (nothing changes, the caller of
// CloseDeal gets the error): the request is published if and only if the
// close commits.
type InvoicePublisher func(ctx context.Context, tx pgx.Tx, req domain.InvoiceRequest, meta domain.Metadata) error

// WithInvoicePublisher makes CloseDeal publish a won deal's invoice request
// with p instead of writing it to the outbox (outbox.InvoiceTopic), for
// instance by inserting a job of another queue in the same transaction.
// Only CloseDeal is affected: re-injects of dead letters still go through
// the outbox. nil keeps the outbox.
func WithInvoicePublisher(p InvoicePublisher) Option {
	return func(s *Store) { s.invoicePublisher = p }
}

// RecordInvoiceTx is RecordInvoice inside the caller's transaction tx:
// InvoiceCreated is appended and the deal projected as invoiced, or nothing
// is done and false is returned when the invoice of key was already
// recorded. Nothing is durable until the caller commits tx; if tx rolls
// back, so does the recording. Use it to record the invoice atomically with
// the caller's own writes (e.g. completing a job of another queue).
func (s *Store) RecordInvoiceTx(ctx context.Context, tx pgx.Tx, dealID, key, number string, meta domain.Metadata) (bool, error) {
	recorded, err := recordInvoiceTx(ctx, tx, dealID, key, number, meta, nil)
	if err != nil {
		return false, fmt.Errorf("cannot record invoice for deal %s: %w", dealID, err)
	}
	return recorded, nil
}

// recordInvoiceTx is the body of RecordInvoice and RecordInvoiceTx. The
// statements queued in also run in its first round trip, whether or not
// the invoice is recorded now.
func recordInvoiceTx(ctx context.Context, tx pgx.Tx, dealID, key, number string, meta domain.Metadata, also *pgx.Batch) (bool, error) {
	if !validUUID(dealID) {
		return false, domain.ErrNotFound
	}
	// The deal (locked), the saga's failed attempts and the re-injected
	// dead letters this success resolves (locked, after the deal as
	// before) in one round trip.
	var (
		b      pgx.Batch
		d      *domain.Deal
		derr   error
		failed int
		dls    []deadLetterRef
	)
	b.Queue(dealColumns+` WHERE id=$1 FOR UPDATE`, dealID).QueryRow(func(row pgx.Row) error {
		d, derr = scanDeal(row)
		d, derr = dealLoaded(dealID, d, derr)
		return nil
	})
	b.Queue(`SELECT attempts FROM invoice_sagas WHERE idempotency_key=$1`, key).QueryRow(func(row pgx.Row) error {
		if err := row.Scan(&failed); err != nil && !errors.Is(err, pgx.ErrNoRows) && derr == nil {
			return fmt.Errorf("cannot read saga %s: %w", key, err)
		}
		return nil
	})
	b.Queue(`SELECT id::text, version FROM dead_letters WHERE deal_id=$1 AND idempotency_key=$2 AND state='reinjected' FOR UPDATE`,
		dealID, key).Query(func(rows pgx.Rows) error {
		var err error
		dls, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (deadLetterRef, error) {
			var x deadLetterRef
			return x, r.Scan(&x.id, &x.v)
		})
		if err != nil && derr == nil {
			return fmt.Errorf("cannot read re-injected dead letters: %w", err)
		}
		return nil
	})
	if also != nil {
		b.QueuedQueries = append(b.QueuedQueries, also.QueuedQueries...)
	}
	cerr := tx.SendBatch(ctx, &b).Close()
	if derr != nil { // the deal's own error names it best
		return false, derr
	}
	if cerr != nil {
		return false, cerr
	}
	change, err := d.RecordInvoice(key, number, failed+1)
	if err != nil || change == nil {
		return false, err
	}
	if _, err := appendAndProject(ctx, tx, meta, *change); err != nil {
		return false, err
	}
	// A re-injected dead letter of this saga is resolved by its success.
	if err := resolveDeadLettersTx(ctx, tx, dls, number, meta); err != nil {
		return false, err
	}
	return true, nil
}

// deadLetterRef is a dead letter's id and version.
type deadLetterRef struct {
	id string
	v  int
}

// resolveDeadLettersTx closes what a successful re-injected saga leaves
// open: its dead letters dls (resolved) and their alerts (resolved). It runs
// in the transaction that records the invoice, which locked dls.
func resolveDeadLettersTx(ctx context.Context, tx pgx.Tx, dls []deadLetterRef, invoiceNumber string, meta domain.Metadata) error {
	for _, d := range dls {
		if _, err := appendAndProject(ctx, tx, meta, domain.Change{StreamID: domain.DeadLetterStream(d.id), ExpectedVersion: d.v,
			Events: []domain.Event{domain.DeadLetterResolved{DeadLetterID: d.id, InvoiceNumber: invoiceNumber}}}); err != nil {
			return err
		}
		if err := resolveAlertsTx(ctx, tx, `dead_letter_id=$1`, d.id, "the re-injected invoice request succeeded: "+invoiceNumber, meta); err != nil {
			return err
		}
	}
	return nil
}
