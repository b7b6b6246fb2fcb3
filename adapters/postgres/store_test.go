package postgres_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var (
	meta        = domain.Metadata{Actor: "store-test", CorrelationID: "corr-1"}
	errInjected = errors.New("injected failure before commit")
	customer    = domain.Customer{ID: "C-1", Name: "Acme GmbH"}
)

// newPool opens a pool of maxConns connections on a fresh migrated database.
func newPool(t *testing.T, maxConns int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// tables are every table a command writes, with a total order for dumps.
var tables = map[string]string{
	"events":           "position",
	"deals":            "id",
	"inventory":        "sku",
	"invoice_sagas":    "idempotency_key",
	"watermill_outbox": `"offset"`,
}

// dbState is the full content of every table a command writes, one string
// per table: comparing two states compares every row and column.
type dbState map[string]string

func dump(t *testing.T, ctx context.Context, q postgres.Querier) dbState {
	t.Helper()
	st, err := dumpState(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func dumpState(ctx context.Context, q postgres.Querier) (dbState, error) {
	st := dbState{}
	for table, order := range tables {
		var s string
		err := q.QueryRow(ctx, fmt.Sprintf(`SELECT coalesce(string_agg(t::text, E'\n' ORDER BY %s), '') FROM %s t`, order, table)).Scan(&s)
		if err != nil {
			return nil, fmt.Errorf("dump %s: %w", table, err)
		}
		st[table] = s
	}
	return st, nil
}

func assertUnchanged(t *testing.T, before, after dbState) {
	t.Helper()
	for _, table := range slices.Sorted(maps.Keys(tables)) {
		if before[table] != after[table] {
			t.Errorf("table %s changed:\nbefore:\n%s\nafter:\n%s", table, before[table], after[table])
		}
	}
}

func count(t *testing.T, ctx context.Context, q postgres.Querier, sql string, args ...any) int {
	t.Helper()
	var n int
	if err := q.QueryRow(ctx, sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func lines(skuQty ...any) []domain.Line {
	var out []domain.Line
	for i := 0; i < len(skuQty); i += 2 {
		out = append(out, domain.Line{SKU: skuQty[i].(string), Description: "item", Quantity: int64(skuQty[i+1].(int)), UnitPrice: "12.50"})
	}
	return out
}

func createDeal(t *testing.T, s *postgres.Store, l []domain.Line) postgres.DealView {
	t.Helper()
	d, err := s.CreateDeal(t.Context(), customer, "EUR", l, meta)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func setStock(t *testing.T, s *postgres.Store, sku string, n int64) {
	t.Helper()
	if _, err := s.SetInventory(t.Context(), sku, n, meta); err != nil {
		t.Fatal(err)
	}
}

// eventTypesAfter lists (stream, type) of the events after position pos.
func eventTypesAfter(t *testing.T, ctx context.Context, q postgres.Querier, pos int64) []string {
	t.Helper()
	rows, err := q.Query(ctx, `SELECT stream_id || ' ' || type FROM events WHERE position > $1 ORDER BY position`, pos)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func lastPosition(t *testing.T, ctx context.Context, q postgres.Querier) int64 {
	t.Helper()
	var p int64
	if err := q.QueryRow(ctx, `SELECT coalesce(max(position), 0) FROM events`).Scan(&p); err != nil {
		t.Fatal(err)
	}
	return p
}

// failingStore returns a store over pool whose every unit of work fails in
// its before-commit hook. The hook first reads the state inside the
// transaction, so the test can prove the writes had been made (and were
// then rolled back), not skipped.
func failingStore(pool *pgxpool.Pool) (*postgres.Store, func() dbState) {
	var (
		mu   sync.Mutex
		inTx dbState
	)
	s := postgres.NewStore(pool, postgres.WithBeforeCommit(func(ctx context.Context, tx pgx.Tx) error {
		st, err := dumpState(ctx, tx)
		if err != nil {
			return err
		}
		mu.Lock()
		inTx = st
		mu.Unlock()
		return errInjected
	}))
	return s, func() dbState {
		mu.Lock()
		defer mu.Unlock()
		return inTx
	}
}

// TestUnitOfWorkIsAtomic (I1): a failure after all of a command's writes
// and before COMMIT leaves no trace of any of them.
func TestUnitOfWorkIsAtomic(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	failing, inTx := failingStore(pool)

	setStock(t, store, "SKU-A", 10)
	deal := createDeal(t, store, lines("SKU-A", 3))

	t.Run("CreateDeal", func(t *testing.T) {
		before := dump(t, ctx, pool)
		_, err := failing.CreateDeal(ctx, customer, "EUR", lines("SKU-A", 1), meta)
		if !errors.Is(err, errInjected) {
			t.Fatalf("CreateDeal error = %v, want the injected failure", err)
		}
		if in := inTx(); in["deals"] == before["deals"] || in["events"] == before["events"] {
			t.Fatal("the hook did not see the deal and its event: the test proves nothing")
		}
		assertUnchanged(t, before, dump(t, ctx, pool))
	})

	t.Run("SetInventory", func(t *testing.T) {
		before := dump(t, ctx, pool)
		_, err := failing.SetInventory(ctx, "SKU-A", 99, meta)
		if !errors.Is(err, errInjected) {
			t.Fatalf("SetInventory error = %v, want the injected failure", err)
		}
		if in := inTx(); in["inventory"] == before["inventory"] || in["events"] == before["events"] {
			t.Fatal("the hook did not see the inventory change and its event")
		}
		assertUnchanged(t, before, dump(t, ctx, pool))
		_, err = failing.SetInventory(ctx, "SKU-NEW", 5, meta)
		if !errors.Is(err, errInjected) {
			t.Fatalf("SetInventory (new SKU) error = %v, want the injected failure", err)
		}
		assertUnchanged(t, before, dump(t, ctx, pool))
	})

	t.Run("CloseDeal", func(t *testing.T) {
		before := dump(t, ctx, pool)
		_, err := failing.CloseDeal(ctx, deal.ID, domain.OutcomeWon, nil, meta)
		if !errors.Is(err, errInjected) {
			t.Fatalf("CloseDeal error = %v, want the injected failure", err)
		}
		in := inTx()
		for _, table := range []string{"deals", "inventory", "events", "invoice_sagas", "watermill_outbox"} {
			if in[table] == before[table] {
				t.Errorf("the hook did not see the close's write to %s", table)
			}
		}
		assertUnchanged(t, before, dump(t, ctx, pool))
		got, err := store.GetDeal(ctx, deal.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Status != domain.StatusOpen || got.Version != 1 || len(got.Events) != 1 {
			t.Fatalf("deal after failed close: status %s, version %d, %d events", got.Status, got.Version, len(got.Events))
		}
	})

	t.Run("CloseDealCommits", func(t *testing.T) {
		pos := lastPosition(t, ctx, pool)
		inv0, err := store.GetInventory(ctx, "SKU-A")
		if err != nil {
			t.Fatal(err)
		}
		got, err := store.CloseDeal(ctx, deal.ID, domain.OutcomeWon, nil, meta)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{domain.DealStream(deal.ID) + " " + domain.TypeDealWon, domain.InventoryStream("SKU-A") + " " + domain.TypeInventoryAllocated}
		if evs := eventTypesAfter(t, ctx, pool, pos); !slices.Equal(evs, want) {
			t.Fatalf("events written: %v, want %v", evs, want)
		}
		if got.Status != domain.StatusWon || got.Version != 2 || got.IdempotencyKey == nil || *got.IdempotencyKey != domain.IdempotencyKey(deal.ID, 2) {
			t.Fatalf("deal after close: %+v", got)
		}
		inv, err := store.GetInventory(ctx, "SKU-A")
		if err != nil {
			t.Fatal(err)
		}
		if inv.Available != inv0.Available-3 || inv.Allocated != inv0.Allocated+3 || inv.Version != inv0.Version+1 {
			t.Fatalf("inventory %+v after allocating 3 from %+v", inv, inv0)
		}
		if st, ok, err := store.InvoiceState(ctx, domain.IdempotencyKey(deal.ID, 2)); err != nil || !ok || st != "pending" {
			t.Fatalf("saga state = %q, %v, %v; want pending", st, ok, err)
		}
		msgs := outboxMessages(t, ctx, pool)
		if len(msgs) != 1 {
			t.Fatalf("%d outbox rows, want 1", len(msgs))
		}
		m := msgs[0]
		if m.DestinationTopic != outbox.InvoiceTopic || m.Metadata[outbox.MetadataType] != outbox.TypeInvoiceRequest ||
			m.Metadata[outbox.MetadataIdempotencyKey] != domain.IdempotencyKey(deal.ID, 2) {
			t.Fatalf("outbox message %+v", m)
		}
		var req domain.InvoiceRequest
		if err := json.Unmarshal(m.Payload, &req); err != nil {
			t.Fatal(err)
		}
		if req.DealID != deal.ID || req.IdempotencyKey != domain.IdempotencyKey(deal.ID, 2) || req.CloseVersion != 2 ||
			req.Total != "37.50" || req.Currency != "EUR" || len(req.Lines) != 1 {
			t.Fatalf("invoice request %+v", req)
		}
	})
}

// envelope is the forwarder envelope an outbox row holds.
type envelope struct {
	DestinationTopic string            `json:"destination_topic"`
	UUID             string            `json:"uuid"`
	Payload          []byte            `json:"payload"`
	Metadata         map[string]string `json:"metadata"`
}

func outboxMessages(t *testing.T, ctx context.Context, q postgres.Querier) []envelope {
	t.Helper()
	rows, err := q.Query(ctx, `SELECT payload::text FROM watermill_outbox ORDER BY "offset"`)
	if err != nil {
		t.Fatal(err)
	}
	bodies, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	out := make([]envelope, len(bodies))
	for i, b := range bodies {
		if err := json.Unmarshal([]byte(b), &out[i]); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// TestCloseWithInsufficientStockChangesNothing: the allocation is all or
// nothing; the first SKU has stock, the second does not.
func TestCloseWithInsufficientStockChangesNothing(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	setStock(t, store, "SKU-A", 10)
	setStock(t, store, "SKU-B", 2)
	deal := createDeal(t, store, lines("SKU-A", 4, "SKU-B", 3))

	before := dump(t, ctx, pool)
	_, err := store.CloseDeal(ctx, deal.ID, domain.OutcomeWon, nil, meta)
	var ise *domain.InsufficientStockError
	if !errors.As(err, &ise) {
		t.Fatalf("error = %v, want *domain.InsufficientStockError", err)
	}
	if ise.SKU != "SKU-B" || ise.Requested != 3 || ise.Available != 2 {
		t.Fatalf("InsufficientStockError %+v, want SKU-B requested 3 available 2", ise)
	}
	assertUnchanged(t, before, dump(t, ctx, pool))
}

// TestConcurrentClosesNeverOversell: 20 deals share a SKU with stock for 10.
func TestConcurrentClosesNeverOversell(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const deals, stock = 20, 10
	pool := newPool(t, deals+4)
	store := postgres.NewStore(pool)
	setStock(t, store, "SKU-S", stock)
	ids := make([]string, deals)
	for i := range ids {
		ids[i] = createDeal(t, store, lines("SKU-S", 1)).ID
	}

	start := make(chan struct{})
	errs := make([]error, deals)
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			<-start
			_, errs[i] = store.CloseDeal(ctx, id, domain.OutcomeWon, nil, meta)
		})
	}
	close(start)
	wg.Wait()

	won := 0
	for i, err := range errs {
		var ise *domain.InsufficientStockError
		switch {
		case err == nil:
			won++
		case errors.As(err, &ise):
		default:
			t.Errorf("close %d: unexpected error %v", i, err)
		}
	}
	if won != stock {
		t.Fatalf("%d deals won, want exactly %d", won, stock)
	}
	inv, err := store.GetInventory(ctx, "SKU-S")
	if err != nil {
		t.Fatal(err)
	}
	if inv.Available != 0 || inv.Allocated != stock || inv.Version != 1+stock {
		t.Fatalf("inventory %+v, want available 0, allocated %d, version %d", inv, stock, 1+stock)
	}
	if n := count(t, ctx, pool, `SELECT count(*) FROM deals WHERE status='won'`); n != stock {
		t.Errorf("%d deals won in the read model, want %d", n, stock)
	}
	if n := count(t, ctx, pool, `SELECT count(*) FROM events WHERE type=$1`, domain.TypeInventoryAllocated); n != stock {
		t.Errorf("%d InventoryAllocated events, want %d", n, stock)
	}
	if n := count(t, ctx, pool, `SELECT count(*) FROM watermill_outbox`); n != stock {
		t.Errorf("%d outbox rows, want %d", n, stock)
	}
	// The stream folds to the same stock, never below zero on the way.
	recs, err := postgres.LoadStream(ctx, pool, domain.InventoryStream("SKU-S"))
	if err != nil {
		t.Fatal(err)
	}
	var avail int64
	for _, r := range recs {
		switch e := r.Event.(type) {
		case domain.InventorySet:
			avail = e.Available
		case domain.InventoryAllocated:
			avail -= e.Quantity
		}
		if avail < 0 {
			t.Fatalf("stock negative (%d) at stream version %d", avail, r.StreamVersion)
		}
	}
	if avail != 0 {
		t.Fatalf("stream folds to %d available, want 0", avail)
	}
}

// TestConcurrentDoubleCloseOneWins: several concurrent closes of one deal,
// exactly one takes effect.
func TestConcurrentDoubleCloseOneWins(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		expected *int
	}{{"no expected version", nil}, {"expected version 1", ptr(1)}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			const closers = 5
			pool := newPool(t, closers+2)
			store := postgres.NewStore(pool)
			setStock(t, store, "SKU-D", 100)
			deal := createDeal(t, store, lines("SKU-D", 7))

			start := make(chan struct{})
			errs := make([]error, closers)
			var wg sync.WaitGroup
			for i := range closers {
				wg.Go(func() {
					<-start
					_, errs[i] = store.CloseDeal(ctx, deal.ID, domain.OutcomeWon, tc.expected, meta)
				})
			}
			close(start)
			wg.Wait()
			ok := 0
			for i, err := range errs {
				var te *domain.TransitionError
				switch {
				case err == nil:
					ok++
				case errors.As(err, &te), errors.Is(err, domain.ErrVersionConflict):
				default:
					t.Errorf("close %d: unexpected error %v", i, err)
				}
			}
			if ok != 1 {
				t.Fatalf("%d closes succeeded, want exactly 1 (errors %v)", ok, errs)
			}
			if n := count(t, ctx, pool, `SELECT count(*) FROM events WHERE type=$1`, domain.TypeDealWon); n != 1 {
				t.Errorf("%d DealWon events, want 1", n)
			}
			if n := count(t, ctx, pool, `SELECT count(*) FROM watermill_outbox`); n != 1 {
				t.Errorf("%d outbox rows, want 1", n)
			}
			inv, err := store.GetInventory(ctx, "SKU-D")
			if err != nil {
				t.Fatal(err)
			}
			if inv.Available != 93 || inv.Allocated != 7 {
				t.Errorf("inventory %+v, want 93 available, 7 allocated", inv)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// TestCloseWithWrongExpectedVersionWritesNothing: the optimistic check.
func TestCloseWithWrongExpectedVersionWritesNothing(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	setStock(t, store, "SKU-V", 10)
	deal := createDeal(t, store, lines("SKU-V", 1))
	before := dump(t, ctx, pool)
	for _, v := range []int{0, 2, 5} {
		_, err := store.CloseDeal(ctx, deal.ID, domain.OutcomeWon, ptr(v), meta)
		if !errors.Is(err, domain.ErrVersionConflict) {
			t.Fatalf("close with expected version %d: error %v, want a version conflict", v, err)
		}
		_, err = store.CloseDeal(ctx, deal.ID, domain.OutcomeLost, ptr(v), meta)
		if !errors.Is(err, domain.ErrVersionConflict) {
			t.Fatalf("close lost with expected version %d: error %v, want a version conflict", v, err)
		}
	}
	assertUnchanged(t, before, dump(t, ctx, pool))
	// The right version works: the conflicts were not spurious.
	if _, err := store.CloseDeal(ctx, deal.ID, domain.OutcomeWon, ptr(1), meta); err != nil {
		t.Fatalf("close with the right version: %v", err)
	}
}

// TestEventLog: optimistic appends and the append-only trigger.
func TestEventLog(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	deal := createDeal(t, store, lines("SKU-E", 1))
	stream := domain.DealStream(deal.ID)

	t.Run("stale expected version conflicts", func(t *testing.T) {
		before := dump(t, ctx, pool)
		lost := domain.DealLost{DealID: deal.ID, PreviousStatus: domain.StatusOpen}
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
		_, err = postgres.AppendTx(ctx, tx, domain.Change{StreamID: stream, ExpectedVersion: 0, Events: []domain.Event{lost}}, meta)
		if !errors.Is(err, domain.ErrVersionConflict) {
			t.Fatalf("append at stale version 0: %v, want a version conflict", err)
		}
		var ce *domain.ConflictError
		if !errors.As(err, &ce) || ce.Stream != stream {
			t.Fatalf("error %v is not a *domain.ConflictError on %s", err, stream)
		}
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		assertUnchanged(t, before, dump(t, ctx, pool))

		// The current version appends (in a transaction rolled back).
		tx2, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx2.Rollback(context.WithoutCancel(ctx)) }()
		recs, err := postgres.AppendTx(ctx, tx2, domain.Change{StreamID: stream, ExpectedVersion: 1, Events: []domain.Event{lost}}, meta)
		if err != nil || len(recs) != 1 || recs[0].StreamVersion != 2 {
			t.Fatalf("append at current version: %v, %+v", err, recs)
		}
	})

	t.Run("append only", func(t *testing.T) {
		before := dump(t, ctx, pool)
		if before["events"] == "" {
			t.Fatal("no events to tamper with")
		}
		for _, sql := range []string{
			`UPDATE events SET type = type`,
			`UPDATE events SET payload = '{}'::jsonb WHERE stream_id = '` + stream + `'`,
			`DELETE FROM events`,
			`DELETE FROM events WHERE stream_id = '` + stream + `'`,
			`TRUNCATE events`,
			`TRUNCATE events CASCADE`,
		} {
			_, err := pool.Exec(ctx, sql)
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
				t.Errorf("%s: error %v, want insufficient_privilege from the append-only trigger", sql, err)
			}
		}
		assertUnchanged(t, before, dump(t, ctx, pool))
	})
}

// TestLateAttemptFailureDoesNotReopenInvoicedSaga: a delivery whose ERP
// attempt failed (say 409, key in flight) records its failure after a
// concurrent delivery recorded the invoice. InvoiceCreated is on the deal
// stream, so the saga's version check cannot catch this; the finished saga
// must stay invoiced and nothing must be appended.
func TestLateAttemptFailureDoesNotReopenInvoicedSaga(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	setStock(t, store, "SKU-L", 5)
	deal := createDeal(t, store, lines("SKU-L", 1))
	deal, err := store.CloseDeal(ctx, deal.ID, domain.OutcomeWon, nil, meta)
	if err != nil {
		t.Fatal(err)
	}
	key := *deal.IdempotencyKey
	read, ok, err := store.Saga(ctx, key) // what the failing delivery read
	if err != nil || !ok {
		t.Fatalf("saga %s: %v, %v", key, ok, err)
	}
	if _, err := store.RecordInvoice(ctx, deal.ID, key, "INV-000001", meta); err != nil {
		t.Fatal(err)
	}
	before := dump(t, ctx, pool)
	at := deal.UpdatedAt
	err = store.RecordAttemptFailure(ctx, domain.InvoiceAttemptFailed{
		DealID: deal.ID, IdempotencyKey: key, Attempt: read.Attempts + 1, ErrorClass: domain.ErrorTransient,
		StatusCode: 409, Message: "key in flight", AttemptedAt: at, NextAttemptAt: at.Add(time.Second),
	}, read.Version, meta)
	if err != nil {
		t.Fatalf("late attempt failure: %v", err)
	}
	if st, _, err := store.InvoiceState(ctx, key); err != nil || st != domain.SagaInvoiced {
		t.Fatalf("saga state %q (%v) after a late attempt failure, want %s", st, err, domain.SagaInvoiced)
	}
	assertUnchanged(t, before, dump(t, ctx, pool))
}
