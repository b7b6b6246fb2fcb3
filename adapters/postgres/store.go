package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	pool         *pgxpool.Pool
	beforeCommit func(ctx context.Context, tx pgx.Tx) error
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
	s := &Store{pool: pool}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Pool returns the store's pool.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// unit runs fn in one transaction and commits it, returning the commit error
// if the commit fails: success means durable.
func (s *Store) unit(ctx context.Context, fn func(tx pgx.Tx) error) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("cannot begin transaction: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if err := fn(tx); err != nil {
		return err
	}
	if s.beforeCommit != nil {
		if err := s.beforeCommit(ctx, tx); err != nil {
			return fmt.Errorf("before commit: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("cannot commit: %w", err)
	}
	return nil
}

// appendAndProject appends every change and applies the projections.
func appendAndProject(ctx context.Context, tx pgx.Tx, meta domain.Metadata, changes ...domain.Change) ([]domain.RecordedEvent, error) {
	var all []domain.RecordedEvent
	for _, c := range changes {
		recs, err := AppendTx(ctx, tx, c, meta)
		if err != nil {
			return nil, err
		}
		if err := projections.Apply(ctx, tx, recs...); err != nil {
			return nil, err
		}
		all = append(all, recs...)
	}
	return all, nil
}

// CreateDeal opens a new deal with a fresh id.
func (s *Store) CreateDeal(ctx context.Context, customer domain.Customer, currency string, lines []domain.Line, meta domain.Metadata) (DealView, error) {
	id := watermill.NewUUID()
	_, change, err := domain.NewDeal(id, customer, currency, lines)
	if err != nil {
		return DealView{}, err
	}
	err = s.unit(ctx, func(tx pgx.Tx) error {
		_, err := appendAndProject(ctx, tx, meta, change)
		return err
	})
	if err != nil {
		return DealView{}, fmt.Errorf("cannot create deal: %w", err)
	}
	return s.GetDeal(ctx, id)
}

// loadDealForUpdate reads the deal's read-model row with a row lock, which
// serialises commands on one deal; the stream's unique version constraint
// is the second line of defence.
func loadDealForUpdate(ctx context.Context, tx pgx.Tx, id string) (*domain.Deal, error) {
	if !validUUID(id) {
		return nil, domain.ErrNotFound
	}
	var (
		s            domain.DealSnapshot
		lines        []byte
		closeVersion *int
		prev, key    *string
		invNo        *string
	)
	err := tx.QueryRow(ctx, `SELECT id::text, customer_id, customer_name, currency, lines, total, status, version,
			close_version, status_before_close, idempotency_key, invoice_number
		FROM deals WHERE id=$1 FOR UPDATE`, id).Scan(&s.ID, &s.Customer.ID, &s.Customer.Name, &s.Currency, &lines,
		&s.Total, &s.Status, &s.Version, &closeVersion, &prev, &key, &invNo)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, domain.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("cannot load deal %s: %w", id, err)
	}
	if err := json.Unmarshal(lines, &s.Lines); err != nil {
		return nil, fmt.Errorf("deal %s lines: %w", id, err)
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

// CloseDeal closes a deal. For a win, in one transaction: the deal's
// inventory rows are locked in SKU order, the allocation is checked, the
// events are appended and projected, and the invoice request is written to
// the outbox. Not enough stock → *domain.InsufficientStockError and nothing
// changes.
func (s *Store) CloseDeal(ctx context.Context, id string, outcome domain.Outcome, expectedVersion *int, meta domain.Metadata) (DealView, error) {
	err := s.unit(ctx, func(tx pgx.Tx) error {
		d, err := loadDealForUpdate(ctx, tx, id)
		if err != nil {
			return err
		}
		stock := map[string]domain.Stock{}
		if outcome == domain.OutcomeWon {
			for _, q := range d.Quantities() {
				st, err := lockStock(ctx, tx, q.SKU)
				if err != nil {
					return err
				}
				stock[q.SKU] = st
			}
		}
		changes, err := d.Close(outcome, expectedVersion, stock)
		if err != nil {
			return err
		}
		if _, err := appendAndProject(ctx, tx, meta, changes...); err != nil {
			return err
		}
		d.Apply(changes[0].Events...)
		if outcome != domain.OutcomeWon {
			return nil
		}
		msg, err := invoiceMessage(d.InvoiceRequestFor(), meta)
		if err != nil {
			return err
		}
		return outbox.PublishTx(ctx, tx, outbox.InvoiceTopic, msg)
	})
	if err != nil {
		return DealView{}, fmt.Errorf("cannot close deal %s: %w", id, err)
	}
	return s.GetDeal(ctx, id)
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
	recorded := false
	err := s.unit(ctx, func(tx pgx.Tx) error {
		d, err := loadDealForUpdate(ctx, tx, dealID)
		if err != nil {
			return err
		}
		change, err := d.RecordInvoice(key, number)
		if err != nil || change == nil {
			return err
		}
		if _, err := appendAndProject(ctx, tx, meta, *change); err != nil {
			return err
		}
		recorded = true
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("cannot record invoice for deal %s: %w", dealID, err)
	}
	return recorded, nil
}

// InvoiceState returns the saga state for key ("pending", "invoiced", …) and
// whether it exists.
func (s *Store) InvoiceState(ctx context.Context, key string) (string, bool, error) {
	var st string
	err := s.pool.QueryRow(ctx, `SELECT state FROM invoice_sagas WHERE idempotency_key=$1`, key).Scan(&st)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("cannot read saga %s: %w", key, err)
	}
	return st, true, nil
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
	var (
		v     DealView
		lines []byte
		invNo *string
	)
	err := s.pool.QueryRow(ctx, `SELECT id::text, status, version, customer_id, customer_name, currency, lines, total,
			close_version, idempotency_key, invoice_number, created_at, updated_at
		FROM deals WHERE id=$1`, id).Scan(&v.ID, &v.Status, &v.Version, &v.Customer.ID, &v.Customer.Name, &v.Currency,
		&lines, &v.Total, &v.CloseVersion, &v.IdempotencyKey, &invNo, &v.CreatedAt, &v.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return DealView{}, domain.ErrNotFound
	}
	if err != nil {
		return DealView{}, fmt.Errorf("cannot read deal %s: %w", id, err)
	}
	if err := json.Unmarshal(lines, &v.Lines); err != nil {
		return DealView{}, fmt.Errorf("deal %s lines: %w", id, err)
	}
	if invNo != nil && v.IdempotencyKey != nil {
		v.Invoice = &InvoiceView{Number: *invNo, IdempotencyKey: *v.IdempotencyKey}
	}
	rows, err := s.pool.Query(ctx, `SELECT position, type, stream_version, schema_version, payload, recorded_at
		FROM events WHERE stream_id=$1 ORDER BY stream_version`, domain.DealStream(id))
	if err != nil {
		return DealView{}, fmt.Errorf("cannot read deal %s events: %w", id, err)
	}
	v.Events, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (EventView, error) {
		var e EventView
		err := r.Scan(&e.Position, &e.Type, &e.StreamVersion, &e.SchemaVersion, &e.Payload, &e.RecordedAt)
		return e, err
	})
	if err != nil {
		return DealView{}, fmt.Errorf("cannot read deal %s events: %w", id, err)
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
