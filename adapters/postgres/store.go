package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
	"github.com/dealbridge/dealbridge/projections"
)

// Store runs dealbridge's commands. Each command is one unit of work: it
// loads what it needs with row locks, asks the domain for events, appends
// them, applies the projections and writes the outbox messages through ONE
// pgx transaction, and reports success only after Commit returned nil
// (invariant I1).
type Store struct {
	pool               *pgxpool.Pool
	beforeCommit       func(ctx context.Context, tx pgx.Tx) error
	alertNotifications bool
	invoicePublisher   InvoicePublisher // nil: the outbox (see WithInvoicePublisher)
	notifier           *outbox.Notifier // wakes the relays after commits that wrote the outbox
}

// WithAlertNotifications makes every alert also write a message to the
// outbox topic outbox.AlertTopic, for the outbound alert webhook.
func WithAlertNotifications(on bool) Option {
	return func(s *Store) { s.alertNotifications = on }
}

// Option configures a Store.
type Option func(*Store)

// WithBeforeCommit installs a hook run inside every unit of work after all
// its writes and before COMMIT. A non-nil error rolls the unit back. It
// exists for fault-injection tests.
func WithBeforeCommit(f func(ctx context.Context, tx pgx.Tx) error) Option {
	return func(s *Store) { s.beforeCommit = f }
}

// NewStore returns a Store over pool.
func NewStore(pool *pgxpool.Pool, opts ...Option) *Store {
	if pool == nil {
		panic("postgres.NewStore: nil pool")
	}
	s := &Store{pool: pool, notifier: outbox.NewNotifier(pool, nil)}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Pool returns the store's pool.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// unit runs fn in one transaction and commits it, returning the commit error
// if the commit fails: success means durable.
//
// Its BEGIN travels with the first statements fn sends (pipeTx).
func (s *Store) unit(ctx context.Context, fn func(tx pgx.Tx) error) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("cannot begin transaction: %w", err)
	}
	tx := &pipeTx{conn: conn}
	defer func() {
		_ = tx.Rollback(context.WithoutCancel(ctx)) // after Commit: ErrTxClosed, nothing sent
		conn.Release()                              // a connection left inside a transaction is closed, not reused
	}()
	mt := markedTx{Tx: tx, wrote: new(atomic.Bool)}
	if err := fn(mt); err != nil {
		return err
	}
	if s.beforeCommit != nil {
		if err := s.beforeCommit(ctx, tx); err != nil {
			return fmt.Errorf("before commit: %w", err)
		}
	}
	var then []string
	if mt.wrote.Load() {
		then = append(then, s.notifier.AfterCommit()) // the relays' wake-up, after the COMMIT, in its round trip
	}
	err = tx.commitThen(ctx, then...)
	var after *errAfterCommit
	if errors.As(err, &after) {
		s.notifier.AfterCommitFailed(ctx, after.err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("cannot commit: %w", err)
	}
	return nil
}

// markedTx is a unit's transaction as fn sees it: it records whether
// outbox.PublishTx wrote through it (or through a savepoint of it), so that
// the relays are woken once the unit has committed.
type markedTx struct {
	pgx.Tx
	wrote *atomic.Bool
}

func (t markedTx) MarkOutboxWrite() { t.wrote.Store(true) }

func (t markedTx) Begin(ctx context.Context) (pgx.Tx, error) {
	sp, err := t.Tx.Begin(ctx)
	if err != nil {
		return nil, err
	}
	return markedTx{Tx: sp, wrote: t.wrote}, nil
}

// appendAndProject appends every change and applies the projections, in
// two round trips: all the inserts pipelined, then all the projection
// statements pipelined (they need the events as stored).
func appendAndProject(ctx context.Context, tx pgx.Tx, meta domain.Metadata, changes ...domain.Change) ([]domain.RecordedEvent, error) {
	return appendAndProjectWith(ctx, tx, meta, nil, changes...)
}

// appendAndProjectWith is appendAndProject that sends the statements queued
// in also (e.g. an outbox insert) with the projections, in their round trip.
func appendAndProjectWith(ctx context.Context, tx pgx.Tx, meta domain.Metadata, also *pgx.Batch, changes ...domain.Change) ([]domain.RecordedEvent, error) {
	recs, err := AppendAllTx(ctx, tx, meta, changes...)
	if err != nil {
		return nil, err
	}
	if err := projections.ApplyPipelinedWith(ctx, tx, also, recs...); err != nil {
		return nil, err
	}
	return recs, nil
}

// CreateDeal opens a new deal with a fresh id.
func (s *Store) CreateDeal(ctx context.Context, customer domain.Customer, currency string, lines []domain.Line, meta domain.Metadata) (DealView, error) {
	id := watermill.NewUUID()
	_, change, err := domain.NewDeal(id, customer, currency, lines)
	if err != nil {
		return DealView{}, err
	}
	var read *dealViewRead
	err = s.unit(ctx, func(tx pgx.Tx) error {
		// The new deal's view is read back with the projections.
		var b pgx.Batch
		read = queueDealView(&b, id)
		_, err := appendAndProjectWith(ctx, tx, meta, &b, change)
		return err
	})
	if err != nil {
		return DealView{}, fmt.Errorf("cannot create deal: %w", err)
	}
	return read.view()
}

// loadDealForUpdate reads the deal's read-model row with a row lock, which
// serialises commands on one deal; the stream's unique version constraint
// is the second line of defence.
func loadDealForUpdate(ctx context.Context, tx pgx.Tx, id string) (*domain.Deal, error) {
	if !validUUID(id) {
		return nil, domain.ErrNotFound
	}
	d, err := scanDeal(tx.QueryRow(ctx, dealColumns+` WHERE id=$1 FOR UPDATE`, id))
	return dealLoaded(id, d, err)
}

// dealLoaded maps the result of scanning one deal row.
func dealLoaded(id string, d *domain.Deal, err error) (*domain.Deal, error) {
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, domain.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("cannot load deal %s: %w", id, err)
	}
	return d, nil
}

// CloseDeal closes a deal. For a win, in one transaction: the deal's
// inventory rows are locked in SKU order, the allocation is checked, the
// events are appended and projected, and the invoice request is written to
// the outbox. Not enough stock → *domain.InsufficientStockError and nothing
// changes.
func (s *Store) CloseDeal(ctx context.Context, id string, outcome domain.Outcome, expectedVersion *int, meta domain.Metadata) (DealView, error) {
	var read *dealViewRead
	err := s.unit(ctx, func(tx pgx.Tx) error {
		var (
			d     *domain.Deal
			stock map[string]domain.Stock
			err   error
		)
		if outcome == domain.OutcomeWon {
			d, stock, err = loadDealAndStockForUpdate(ctx, tx, id)
		} else {
			d, err = loadDealForUpdate(ctx, tx, id)
		}
		if err != nil {
			return err
		}
		changes, err := d.Close(outcome, expectedVersion, stock)
		if err != nil {
			return err
		}
		d.Apply(changes[0].Events...)
		// After the projections and in their round trip: the invoice
		// request's outbox insert, then the reads of the closed deal's view.
		var also pgx.Batch
		if outcome == domain.OutcomeWon && s.invoicePublisher == nil {
			msg, err := invoiceMessage(d.InvoiceRequestFor(), meta)
			if err != nil {
				return err
			}
			if err := outbox.QueuePublishTx(&also, tx, outbox.InvoiceTopic, msg); err != nil {
				return err
			}
		}
		read = queueDealView(&also, id)
		if _, err := appendAndProjectWith(ctx, tx, meta, &also, changes...); err != nil {
			return err
		}
		if outcome == domain.OutcomeWon && s.invoicePublisher != nil {
			return s.invoicePublisher(ctx, tx, d.InvoiceRequestFor(), meta)
		}
		return nil
	})
	if err != nil {
		return DealView{}, fmt.Errorf("cannot close deal %s: %w", id, err)
	}
	return read.view()
}

func invoiceMessage(req domain.InvoiceRequest, meta domain.Metadata) (*message.Message, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("cannot encode invoice request: %w", err)
	}
	m := message.NewMessage(watermill.NewUUID(), b)
	m.Metadata.Set(outbox.MetadataType, outbox.TypeInvoiceRequest)
	m.Metadata.Set(outbox.MetadataSchemaVersion, "1")
	// One in-flight invoice request per deal, in close order.
	queue.SetOrderingKey(m, req.DealID)
	m.Metadata.Set(outbox.MetadataIdempotencyKey, req.IdempotencyKey)
	if meta.CorrelationID != "" {
		m.Metadata.Set(outbox.MetadataCorrelationID, meta.CorrelationID)
	}
	return m, nil
}

// lockDealStockSQL locks the inventory rows of deal $1's lines in the
// order lockStock's callers use (SKU order, byte-wise like Go's sort: the
// "C" collation), so the two paths cannot deadlock each other. The SKUs
// are computed first, as an array: = ANY(ARRAY(…)) walks the primary key,
// where the IN (…) form was planned as a hash join over every inventory row.
const lockDealStockSQL = `SELECT sku, available, version FROM inventory
	WHERE sku = ANY (ARRAY(SELECT l->>'sku' FROM deals, jsonb_array_elements(deals.lines) AS l WHERE deals.id = $1))
	ORDER BY sku COLLATE "C" FOR UPDATE`

// loadDealAndStockForUpdate is loadDealForUpdate followed by lockStock of
// each of the deal's SKUs, in one round trip: the deal row is locked
// first, then its inventory rows in SKU order. A SKU without an inventory
// row has zero stock.
func loadDealAndStockForUpdate(ctx context.Context, tx pgx.Tx, id string) (*domain.Deal, map[string]domain.Stock, error) {
	if !validUUID(id) {
		return nil, nil, domain.ErrNotFound
	}
	var (
		b     pgx.Batch
		d     *domain.Deal
		derr  error
		stock = map[string]domain.Stock{}
	)
	b.Queue(dealColumns+` WHERE id=$1 FOR UPDATE`, id).QueryRow(func(row pgx.Row) error {
		d, derr = scanDeal(row)
		d, derr = dealLoaded(id, d, derr)
		return nil
	})
	b.Queue(lockDealStockSQL, id).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var st domain.Stock
			if err := rows.Scan(&st.SKU, &st.Available, &st.Version); err != nil {
				return err
			}
			stock[st.SKU] = st
		}
		return rows.Err()
	})
	err := tx.SendBatch(ctx, &b).Close()
	if derr != nil { // the deal's own error names it best
		return nil, nil, derr
	}
	if err != nil {
		return nil, nil, fmt.Errorf("cannot lock the inventory of deal %s: %w", id, err)
	}
	for _, q := range d.Quantities() {
		if _, ok := stock[q.SKU]; !ok {
			stock[q.SKU] = domain.Stock{SKU: q.SKU}
		}
	}
	return d, stock, nil
}

func lockStock(ctx context.Context, tx pgx.Tx, sku string) (domain.Stock, error) {
	st := domain.Stock{SKU: sku}
	err := tx.QueryRow(ctx, `SELECT available, version FROM inventory WHERE sku=$1 FOR UPDATE`, sku).Scan(&st.Available, &st.Version)
	if errors.Is(err, pgx.ErrNoRows) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("cannot lock inventory %s: %w", sku, err)
	}
	return st, nil
}

// SetInventory sets the available stock of a SKU.
func (s *Store) SetInventory(ctx context.Context, sku string, available int64, meta domain.Metadata) (InventoryView, error) {
	err := s.unit(ctx, func(tx pgx.Tx) error {
		if !domain.ValidSKU(sku) {
			return &domain.ValidationError{Field: "sku", Reason: "must be 1-64 letters, digits or ._-"}
		}
		// A missing row cannot be locked, so two first-time writers race
		// on the stream version instead, and one gets a conflict.
		st, err := lockStock(ctx, tx, sku)
		if err != nil {
			return err
		}
		change, err := domain.InventoryChange(sku, available, st)
		if err != nil {
			return err
		}
		_, err = appendAndProject(ctx, tx, meta, change)
		return err
	})
	if err != nil {
		return InventoryView{}, fmt.Errorf("cannot set inventory %s: %w", sku, err)
	}
	return s.GetInventory(ctx, sku)
}

// RecordInvoice records the ERP invoice for the close identified by key, in
// one transaction (InvoiceCreated + deal invoiced). It reports false when the
// invoice was already recorded: redelivery is harmless.
func (s *Store) RecordInvoice(ctx context.Context, dealID, key, number string, meta domain.Metadata) (bool, error) {
	return s.RecordInvoiceWith(ctx, dealID, key, number, meta, nil)
}

// RecordInvoiceWith is RecordInvoice that also runs the statements with
// queues, when non-nil, in the same transaction and in its first round trip
// (so even when the invoice was recorded before): the invoice saga
// acknowledges its work-queue message there (queue.QueueAckTx), so the
// recording and the acknowledgement commit together. An error of with, or
// of its statements, rolls the recording back.
func (s *Store) RecordInvoiceWith(ctx context.Context, dealID, key, number string, meta domain.Metadata,
	with func(b *pgx.Batch) error) (bool, error) {
	recorded := false
	err := s.unit(ctx, func(tx pgx.Tx) error {
		var also *pgx.Batch
		if with != nil {
			also = &pgx.Batch{}
			if err := with(also); err != nil {
				return err
			}
		}
		var err error
		recorded, err = recordInvoiceTx(ctx, tx, dealID, key, number, meta, also)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("cannot record invoice for deal %s: %w", dealID, err)
	}
	return recorded, nil
}

// InvoiceState returns the saga state for key ("pending", "invoiced", …) and
// whether it exists.
func (s *Store) InvoiceState(ctx context.Context, key string) (string, bool, error) {
	v, ok, err := s.Saga(ctx, key)
	return v.State, ok, err
}

// SagaView is an invoice saga's bookkeeping.
type SagaView struct {
	Key            string     `json:"idempotency_key"`
	DealID         string     `json:"deal_id"`
	State          string     `json:"state"`
	Version        int        `json:"version"`
	Attempts       int        `json:"attempts"`
	ErrorClass     *string    `json:"error_class"`
	LastError      *string    `json:"last_error"`
	FirstAttemptAt *time.Time `json:"first_attempt_at"`
	NextAttemptAt  *time.Time `json:"next_attempt_at"`
	InvoiceNumber  *string    `json:"invoice_number"`
}

// Saga returns the saga of key and whether it exists.
func (s *Store) Saga(ctx context.Context, key string) (SagaView, bool, error) {
	var v SagaView
	err := s.pool.QueryRow(ctx, `SELECT idempotency_key, deal_id::text, state, version, attempts, error_class, last_error,
			first_attempt_at, next_attempt_at, invoice_number
		FROM invoice_sagas WHERE idempotency_key=$1`, key).Scan(&v.Key, &v.DealID, &v.State, &v.Version, &v.Attempts,
		&v.ErrorClass, &v.LastError, &v.FirstAttemptAt, &v.NextAttemptAt, &v.InvoiceNumber)
	if errors.Is(err, pgx.ErrNoRows) {
		return SagaView{}, false, nil
	}
	if err != nil {
		return SagaView{}, false, fmt.Errorf("cannot read saga %s: %w", key, err)
	}
	return v, true, nil
}

// RecordAttemptFailure appends a failed ERP attempt to the saga's stream.
// expectedVersion is the saga version the caller read: a concurrent
// recorder makes this fail with a version conflict, and the caller retries.
func (s *Store) RecordAttemptFailure(ctx context.Context, ev domain.InvoiceAttemptFailed, expectedVersion int, meta domain.Metadata) error {
	err := s.unit(ctx, func(tx pgx.Tx) error {
		// A concurrent delivery may have ended the saga (invoice recorded,
		// or compensated) while this attempt ran: InvoiceCreated lives on the
		// deal stream, so the version check cannot see it. The failure is
		// moot then; projecting it would move a finished saga back to
		// retrying.
		var state string
		err := tx.QueryRow(ctx, `SELECT state FROM invoice_sagas WHERE idempotency_key=$1 FOR UPDATE`, ev.IdempotencyKey).Scan(&state)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("cannot lock saga %s: %w", ev.IdempotencyKey, err)
		}
		switch state {
		case domain.SagaInvoiced, domain.SagaCompensated, "failed":
			return nil
		}
		_, err = appendAndProject(ctx, tx, meta, domain.Change{
			StreamID: domain.SagaStream(ev.IdempotencyKey), ExpectedVersion: expectedVersion, Events: []domain.Event{ev},
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("cannot record failed attempt %d of %s: %w", ev.Attempt, ev.IdempotencyKey, err)
	}
	return nil
}

// Failure says why a saga ends without an invoice.
type Failure struct {
	ErrorClass     string
	Reason         string
	Attempts       int
	FirstFailureAt time.Time
	LastFailureAt  time.Time
	// FinalAttempt, when set, is the ERP attempt that ended the saga; it is
	// recorded on the saga's stream just before InvoiceFailed.
	FinalAttempt *domain.InvoiceAttemptFailed
}

// DeadLetterSource is the message being dead-lettered, as it was delivered.
type DeadLetterSource struct {
	MessageUUID string
	Topic       string
	Handler     string
	Payload     []byte
	Metadata    map[string]string
}

// CompensationOutcome tells what Compensate did.
type CompensationOutcome int

const (
	// Compensated: the deal was reverted, its inventory released, an alert
	// raised and the message dead-lettered, all in one transaction.
	Compensated CompensationOutcome = iota + 1
	// AlreadyCompensated: an earlier delivery compensated this close.
	AlreadyCompensated
	// AlreadyInvoiced: the deal is invoiced; it is never compensated.
	AlreadyInvoiced
)

// CompensationResult is what Compensate did and the ids it created.
type CompensationResult struct {
	Outcome      CompensationOutcome
	AlertID      string
	DeadLetterID string
}

// Compensate ends the saga of req without an invoice, in ONE transaction:
// InvoiceFailed; the deal reverted and its inventory released; an alert
// raised; the message dead-lettered; and, when alert notifications are on,
// the alert written to the outbox for the webhook. It is idempotent, and it
// never reverts an invoiced deal.
func (s *Store) Compensate(ctx context.Context, req domain.InvoiceRequest, f Failure, src DeadLetterSource, meta domain.Metadata) (CompensationResult, error) {
	var res CompensationResult
	err := s.unit(ctx, func(tx pgx.Tx) error {
		res = CompensationResult{}
		d, err := loadDealForUpdate(ctx, tx, req.DealID)
		if err != nil {
			return err
		}
		switch {
		case d.Status() == domain.StatusInvoiced:
			res.Outcome = AlreadyInvoiced
			return nil
		case d.Status() == domain.StatusReverted && d.InvoiceKey() == req.IdempotencyKey:
			res.Outcome = AlreadyCompensated
			return nil
		}
		var sagaVersion int
		if err := tx.QueryRow(ctx, `SELECT version FROM invoice_sagas WHERE idempotency_key=$1 FOR UPDATE`, req.IdempotencyKey).
			Scan(&sagaVersion); err != nil {
			return fmt.Errorf("cannot lock saga %s: %w", req.IdempotencyKey, err)
		}
		stock := map[string]domain.Stock{}
		for _, q := range d.Quantities() {
			st, err := lockStock(ctx, tx, q.SKU)
			if err != nil {
				return err
			}
			stock[q.SKU] = st
		}
		revert, err := d.Revert(req.IdempotencyKey, f.Reason, stock)
		if err != nil {
			return err
		}
		res.DeadLetterID = watermill.NewUUID()
		res.AlertID = watermill.NewUUID()
		var dlChange domain.Change
		// A re-injected entry that fails again is reopened, so its history
		// (revisions, re-injects, attempts) stays in one place.
		var prevID string
		var prevVersion int
		err = tx.QueryRow(ctx, `SELECT id::text, version FROM dead_letters WHERE idempotency_key=$1 AND state='reinjected' FOR UPDATE`,
			req.IdempotencyKey).Scan(&prevID, &prevVersion)
		switch {
		case err == nil:
			res.DeadLetterID = prevID
			dlChange = domain.Change{StreamID: domain.DeadLetterStream(prevID), ExpectedVersion: prevVersion,
				Events: []domain.Event{domain.DeadLetterReopened{DeadLetterID: prevID, Reason: f.Reason, ErrorClass: f.ErrorClass,
					Attempts: f.Attempts, LastFailureAt: f.LastFailureAt.UTC()}}}
		case errors.Is(err, pgx.ErrNoRows):
			dlChange = domain.Change{StreamID: domain.DeadLetterStream(res.DeadLetterID),
				Events: []domain.Event{deadLetterEvent(res.DeadLetterID, req.DealID, req.IdempotencyKey, f, src)}}
		default:
			return fmt.Errorf("cannot look for a re-injected dead letter: %w", err)
		}
		alert := domain.AlertRaised{
			AlertID: res.AlertID, Kind: domain.AlertKindInvoiceFailed, Severity: domain.SeverityCritical,
			DealID: req.DealID, IdempotencyKey: req.IdempotencyKey, DeadLetterID: res.DeadLetterID,
			Message: fmt.Sprintf("deal %s was not invoiced (%s after %d attempt(s)): %s; the deal is reverted and its inventory released",
				req.DealID, f.ErrorClass, f.Attempts, f.Reason),
		}
		var sagaEvents []domain.Event
		if f.FinalAttempt != nil {
			sagaEvents = append(sagaEvents, *f.FinalAttempt)
		}
		sagaEvents = append(sagaEvents, domain.InvoiceFailed{DealID: req.DealID, IdempotencyKey: req.IdempotencyKey,
			ErrorClass: domain.ErrorClass(f.ErrorClass), Reason: f.Reason, Attempts: f.Attempts})
		changes := append([]domain.Change{{StreamID: domain.SagaStream(req.IdempotencyKey), ExpectedVersion: sagaVersion,
			Events: sagaEvents}}, revert...)
		changes = append(changes, dlChange,
			domain.Change{StreamID: domain.AlertStream(res.AlertID), Events: []domain.Event{alert}})
		if _, err := appendAndProject(ctx, tx, meta, changes...); err != nil {
			return err
		}
		res.Outcome = Compensated
		return s.notifyAlert(ctx, tx, alert, meta)
	})
	if err != nil {
		return CompensationResult{}, fmt.Errorf("cannot compensate deal %s: %w", req.DealID, err)
	}
	return res, nil
}

func deadLetterEvent(id, dealID, key string, f Failure, src DeadLetterSource) domain.MessageDeadLettered {
	if !validUUID(dealID) {
		dealID = ""
	}
	md := src.Metadata
	if md == nil {
		md = map[string]string{}
	}
	dl := domain.MessageDeadLettered{
		DeadLetterID: id, DealID: dealID, IdempotencyKey: key, MessageUUID: src.MessageUUID,
		Topic: src.Topic, Handler: src.Handler, Metadata: md, Reason: f.Reason, ErrorClass: f.ErrorClass,
		Attempts: f.Attempts, FirstFailureAt: f.FirstFailureAt.UTC(), LastFailureAt: f.LastFailureAt.UTC(),
	}
	dl.SetPayload(src.Payload)
	return dl
}

// DeadLetterTx parks a message that cannot be processed at all (a poison
// message: undecodable, unknown type or version, invalid) with an alert,
// through tx. There is no saga to compensate.
func (s *Store) DeadLetterTx(ctx context.Context, tx pgx.Tx, dealID, key string, f Failure, src DeadLetterSource, meta domain.Metadata) (CompensationResult, error) {
	res := CompensationResult{DeadLetterID: watermill.NewUUID(), AlertID: watermill.NewUUID()}
	dl := deadLetterEvent(res.DeadLetterID, dealID, key, f, src)
	alert := domain.AlertRaised{
		AlertID: res.AlertID, Kind: domain.AlertKindPoison, Severity: domain.SeverityCritical,
		DealID: dl.DealID, IdempotencyKey: key, DeadLetterID: res.DeadLetterID,
		Message: fmt.Sprintf("message %s on %s could not be processed: %s", src.MessageUUID, src.Topic, f.Reason),
	}
	if _, err := appendAndProject(ctx, tx, meta,
		domain.Change{StreamID: domain.DeadLetterStream(res.DeadLetterID), Events: []domain.Event{dl}},
		domain.Change{StreamID: domain.AlertStream(res.AlertID), Events: []domain.Event{alert}}); err != nil {
		return CompensationResult{}, fmt.Errorf("cannot dead-letter message %s: %w", src.MessageUUID, err)
	}
	if err := s.notifyAlert(ctx, tx, alert, meta); err != nil {
		return CompensationResult{}, err
	}
	return res, nil
}

// DeadLetter is DeadLetterTx in a transaction of its own.
func (s *Store) DeadLetter(ctx context.Context, dealID, key string, f Failure, src DeadLetterSource, meta domain.Metadata) (CompensationResult, error) {
	var res CompensationResult
	err := s.unit(ctx, func(tx pgx.Tx) error {
		var err error
		res, err = s.DeadLetterTx(ctx, tx, dealID, key, f, src, meta)
		return err
	})
	return res, err
}

// RaiseAlert raises an alert on its own (e.g. a compensation that could
// not complete).
func (s *Store) RaiseAlert(ctx context.Context, alert domain.AlertRaised, meta domain.Metadata) (string, error) {
	if alert.AlertID == "" {
		alert.AlertID = watermill.NewUUID()
	}
	if !validUUID(alert.DealID) {
		alert.DealID = ""
	}
	err := s.unit(ctx, func(tx pgx.Tx) error {
		if _, err := appendAndProject(ctx, tx, meta,
			domain.Change{StreamID: domain.AlertStream(alert.AlertID), Events: []domain.Event{alert}}); err != nil {
			return err
		}
		return s.notifyAlert(ctx, tx, alert, meta)
	})
	if err != nil {
		return "", fmt.Errorf("cannot raise alert: %w", err)
	}
	return alert.AlertID, nil
}

// notifyAlert writes the alert to the outbox for the alert webhook when
// notifications are on: the webhook is delivered if and only if the alert
// commits, and retried like any other message.
func (s *Store) notifyAlert(ctx context.Context, tx pgx.Tx, alert domain.AlertRaised, meta domain.Metadata) error {
	if !s.alertNotifications {
		return nil
	}
	b, err := json.Marshal(alert)
	if err != nil {
		return fmt.Errorf("cannot encode alert: %w", err)
	}
	m := message.NewMessage(watermill.NewUUID(), b)
	m.Metadata.Set(outbox.MetadataType, outbox.TypeAlertNotification)
	m.Metadata.Set(outbox.MetadataSchemaVersion, "1")
	if meta.CorrelationID != "" {
		m.Metadata.Set(outbox.MetadataCorrelationID, meta.CorrelationID)
	}
	return outbox.PublishTx(ctx, tx, outbox.AlertTopic, m)
}

// EventView is an event as the API shows it.
type EventView struct {
	Position      int64           `json:"position"`
	Type          string          `json:"type"`
	StreamVersion int             `json:"stream_version"`
	SchemaVersion int             `json:"schema_version"`
	Payload       json.RawMessage `json:"payload"`
	RecordedAt    time.Time       `json:"recorded_at"`
}

// InvoiceView is the ERP invoice of a deal.
type InvoiceView struct {
	Number         string `json:"number"`
	IdempotencyKey string `json:"idempotency_key"`
}

// DealView is a deal as the API shows it.
type DealView struct {
	ID             string          `json:"id"`
	Status         domain.Status   `json:"status"`
	Version        int             `json:"version"`
	Customer       domain.Customer `json:"customer"`
	Currency       string          `json:"currency"`
	Lines          []domain.Line   `json:"lines"`
	Total          string          `json:"total"`
	CloseVersion   *int            `json:"close_version,omitempty"`
	IdempotencyKey *string         `json:"idempotency_key,omitempty"`
	Invoice        *InvoiceView    `json:"invoice"`
	CreatedAt      time.Time       `json:"created_at"`
	UpdatedAt      time.Time       `json:"updated_at"`
	Events         []EventView     `json:"events"`
}

// GetDeal returns a deal with its event history.
func (s *Store) GetDeal(ctx context.Context, id string) (DealView, error) {
	if !validUUID(id) {
		return DealView{}, domain.ErrNotFound
	}
	var b pgx.Batch
	r := queueDealView(&b, id)
	if err := s.pool.SendBatch(ctx, &b).Close(); err != nil {
		return DealView{}, fmt.Errorf("cannot read deal %s: %w", id, err)
	}
	return r.view()
}

// dealViewRead is a deal view being read by a batch (queueDealView).
type dealViewRead struct {
	id    string
	v     DealView
	lines []byte
	invNo *string
	found bool
}

// queueDealView queues the reads of deal id's view in b: the row and its
// events, in one round trip. Once b has been sent, view returns it.
func queueDealView(b *pgx.Batch, id string) *dealViewRead {
	r := &dealViewRead{id: id}
	v := &r.v
	b.Queue(`SELECT id::text, status, version, customer_id, customer_name, currency, lines, total,
			close_version, idempotency_key, invoice_number, created_at, updated_at
		FROM deals WHERE id=$1`, id).QueryRow(func(row pgx.Row) error {
		err := row.Scan(&v.ID, &v.Status, &v.Version, &v.Customer.ID, &v.Customer.Name, &v.Currency,
			&r.lines, &v.Total, &v.CloseVersion, &v.IdempotencyKey, &r.invNo, &v.CreatedAt, &v.UpdatedAt)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		r.found = err == nil
		return err
	})
	b.Queue(`SELECT position, type, stream_version, schema_version, payload, recorded_at
		FROM events WHERE stream_id=$1 ORDER BY stream_version`, domain.DealStream(id)).Query(func(rows pgx.Rows) error {
		var err error
		v.Events, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (EventView, error) {
			var e EventView
			err := r.Scan(&e.Position, &e.Type, &e.StreamVersion, &e.SchemaVersion, &e.Payload, &e.RecordedAt)
			return e, err
		})
		return err
	})
	return r
}

// view returns the view read, or domain.ErrNotFound.
func (r *dealViewRead) view() (DealView, error) {
	if !r.found {
		return DealView{}, domain.ErrNotFound
	}
	v := r.v
	if err := json.Unmarshal(r.lines, &v.Lines); err != nil {
		return DealView{}, fmt.Errorf("deal %s lines: %w", r.id, err)
	}
	if r.invNo != nil && v.IdempotencyKey != nil {
		v.Invoice = &InvoiceView{Number: *r.invNo, IdempotencyKey: *v.IdempotencyKey}
	}
	return v, nil
}

// InventoryView is one SKU's stock.
type InventoryView struct {
	SKU       string    `json:"sku"`
	Available int64     `json:"available"`
	Allocated int64     `json:"allocated"`
	Version   int       `json:"version"`
	UpdatedAt time.Time `json:"updated_at"`
}

// GetInventory returns one SKU's stock.
func (s *Store) GetInventory(ctx context.Context, sku string) (InventoryView, error) {
	var v InventoryView
	err := s.pool.QueryRow(ctx, `SELECT sku, available, allocated, version, updated_at FROM inventory WHERE sku=$1`, sku).
		Scan(&v.SKU, &v.Available, &v.Allocated, &v.Version, &v.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return InventoryView{}, domain.ErrNotFound
	}
	if err != nil {
		return InventoryView{}, fmt.Errorf("cannot read inventory %s: %w", sku, err)
	}
	return v, nil
}

func validUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}
