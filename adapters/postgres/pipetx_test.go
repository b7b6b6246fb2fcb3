package postgres_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
)

// roundTrips records what a pool sends: each single statement and each
// batch is one round trip.
type roundTrips struct {
	mu   sync.Mutex
	sent []string // a statement's SQL, or "batch:" + its statements' SQL joined by " | "
}

func (r *roundTrips) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if v := ctx.Value(inBatch{}); v != nil {
		return ctx // a statement of a batch being sent
	}
	r.mu.Lock()
	r.sent = append(r.sent, strings.Join(strings.Fields(d.SQL), " "))
	r.mu.Unlock()
	return ctx
}

func (r *roundTrips) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

type inBatch struct{}

func (r *roundTrips) TraceBatchStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceBatchStartData) context.Context {
	var sqls []string
	for _, q := range d.Batch.QueuedQueries {
		sqls = append(sqls, strings.Join(strings.Fields(q.SQL), " "))
	}
	r.mu.Lock()
	r.sent = append(r.sent, "batch: "+strings.Join(sqls, " | "))
	r.mu.Unlock()
	return context.WithValue(ctx, inBatch{}, true)
}

func (r *roundTrips) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (r *roundTrips) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

func (r *roundTrips) reset() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.sent
	r.sent = nil
	return out
}

// TestUnitBeginsWithItsFirstBatch: a close sends its BEGIN in front of its
// first batch and the relays' wake-up behind its COMMIT, not as round trips
// of their own: four in all (locks, appends, projections, commit). The
// control: a command whose first statement is a single one (SetInventory)
// does send BEGIN alone, so the tracer sees it.
func TestUnitBeginsWithItsFirstBatch(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	cfg, err := pgxpool.ParseConfig(pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	trips := &roundTrips{}
	cfg.ConnConfig.Tracer = trips
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	store := postgres.NewStore(pool)
	setStock(t, store, "SKU-P", 5)
	d := createDeal(t, store, lines("SKU-P", 1))

	trips.reset()
	if _, err := store.SetInventory(ctx, "SKU-P", 6, meta); err != nil {
		t.Fatal(err)
	}
	if sent := trips.reset(); len(sent) == 0 || sent[0] != "begin" {
		t.Fatalf("control: SetInventory sent %q first, want a lone begin", sent)
	}

	listener, err := pgx.Connect(ctx, cfg.ConnString())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close(context.Background()) })
	if _, err := listener.Exec(ctx, `LISTEN dealbridge_outbox`); err != nil {
		t.Fatal(err)
	}

	if _, err := store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); err != nil {
		t.Fatal(err)
	}
	// The commit and the wake-up behind it are one simple-protocol query,
	// below the tracer: the traced round trips are the three batches.
	sent := trips.reset()
	if len(sent) != 3 || !strings.HasPrefix(sent[0], "batch: begin | ") || !strings.Contains(sent[2], `INSERT INTO "watermill_outbox"`) {
		t.Fatalf("the close's round trips before its commit:\n%s\nwant 3: batch: begin | (locks), the appends, the projections and the outbox insert",
			strings.Join(sent, "\n"))
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := listener.WaitForNotification(wctx); err != nil {
		t.Fatalf("no wake-up for the relays after the close: %v", err)
	}
}

// TestUnitCommitOfAFailedTransactionFails: a statement that failed inside
// a unit whose code swallowed the error leaves the transaction aborted; its
// commit is then a rollback and the command fails, with nothing written.
func TestUnitCommitOfAFailedTransactionFails(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	setStock(t, store, "SKU-F", 5)
	d := createDeal(t, store, lines("SKU-F", 1))
	swallowing := postgres.NewStore(pool, postgres.WithBeforeCommit(func(ctx context.Context, tx pgx.Tx) error {
		_, _ = tx.Exec(ctx, `SELECT 1/0`) // error ignored on purpose
		return nil
	}))
	_, err := swallowing.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta)
	if !errors.Is(err, pgx.ErrTxCommitRollback) {
		t.Fatalf("close in an aborted transaction: %v, want pgx.ErrTxCommitRollback", err)
	}
	got, err := store.GetDeal(ctx, d.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != domain.StatusOpen {
		t.Errorf("deal %s after the failed close, want open", got.Status)
	}
	if n := count(t, ctx, pool, `SELECT count(*) FROM watermill_outbox`); n != 0 {
		t.Errorf("%d outbox rows after the failed close, want 0", n)
	}
}
