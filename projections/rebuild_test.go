package projections_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
	"github.com/dealbridge/dealbridge/projections"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var (
	meta     = domain.Metadata{Actor: "replay-test", CorrelationID: "corr-replay"}
	operator = postgres.Actor{Name: "olga", Role: "operator"}
	skus     = []string{"SKU-A", "SKU-B", "SKU-C", "SKU-D"}
)

// simulate drives the store like production does — concurrently, with
// stock contention, failed ERP attempts, retries, compensations, dead-letter
// edits and re-injects, and racing deliveries — and returns counts of what
// happened.
func simulate(t testing.TB, store *postgres.Store, deals, workers int, seed uint64) map[string]int {
	t.Helper()
	ctx := t.Context()
	for _, s := range skus {
		if _, err := store.SetInventory(ctx, s, 40, meta); err != nil {
			t.Fatal(err)
		}
	}
	var (
		mu     sync.Mutex
		counts = map[string]int{}
		wg     sync.WaitGroup
		next   atomic.Int64
		errs   = make(chan error, workers)
	)
	count := func(k string) { mu.Lock(); counts[k]++; mu.Unlock() }
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			for next.Add(1) <= int64(deals) {
				if err := oneDeal(ctx, store, rng, count); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	// Restocking races the closes on the same inventory rows.
	stop := make(chan struct{})
	var restock sync.WaitGroup
	restock.Add(1)
	go func() {
		defer restock.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(3 * time.Millisecond):
			}
			if _, err := store.SetInventory(ctx, skus[i%len(skus)], int64(20+i%30), meta); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(stop)
	restock.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return counts
}

func oneDeal(ctx context.Context, store *postgres.Store, rng *rand.Rand, count func(string)) error {
	var lines []domain.Line
	for i := range 1 + rng.IntN(3) {
		lines = append(lines, domain.Line{SKU: skus[(i+rng.IntN(len(skus)))%len(skus)], Description: "Widget",
			Quantity: int64(1 + rng.IntN(3)), UnitPrice: fmt.Sprintf("%d.50", 10+rng.IntN(90))})
	}
	d, err := store.CreateDeal(ctx, domain.Customer{ID: fmt.Sprintf("C-%d", rng.IntN(50)), Name: "Globex"}, "EUR", lines, meta)
	if err != nil {
		return err
	}
	switch rng.IntN(10) {
	case 0:
		count("open")
		return nil
	case 1:
		_, err := store.CloseDeal(ctx, d.ID, domain.OutcomeLost, nil, meta)
		count("lost")
		return err
	}
	d, err = store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta)
	var short *domain.InsufficientStockError
	if errors.As(err, &short) {
		count("out_of_stock")
		return nil
	}
	if err != nil {
		return err
	}
	key := *d.IdempotencyKey
	// Failed attempts first, like a flaky ERP.
	fails := rng.IntN(4)
	for i := range fails {
		if err := failAttempt(ctx, store, d.ID, key, i+1); err != nil {
			return err
		}
	}
	invoice := func(k string) error {
		_, err := store.RecordInvoice(ctx, d.ID, k, "INV-"+k, meta)
		return err
	}
	switch rng.IntN(6) {
	case 0, 1, 2:
		count("invoiced")
		return invoice(key)
	case 3:
		// A redelivery races the success: the failure and the invoice
		// are recorded concurrently.
		count("raced")
		var wg sync.WaitGroup
		var e1, e2 error
		wg.Add(2)
		go func() { defer wg.Done(); e1 = failAttempt(ctx, store, d.ID, key, fails+1) }()
		go func() { defer wg.Done(); e2 = invoice(key) }()
		wg.Wait()
		if errors.Is(e1, domain.ErrVersionConflict) {
			e1 = nil
		}
		return errors.Join(e1, e2)
	}
	// Retries exhausted or the ERP rejected the payload: compensation.
	res, err := compensate(ctx, store, d, key, fails)
	if err != nil {
		return err
	}
	if rng.IntN(2) == 0 {
		count("compensated")
		return nil
	}
	// The operator fixes the payload and re-injects; the saga then ends
	// invoiced (or is discarded).
	req := invoiceRequest(d, key)
	req.Customer.Name = "Globex Corporation"
	b, _ := json.Marshal(req)
	if _, err := store.EditDeadLetter(ctx, res.DeadLetterID, b, "customer name fixed", operator); err != nil {
		return err
	}
	if rng.IntN(4) == 0 {
		count("discarded")
		return store.DiscardDeadLetter(ctx, res.DeadLetterID, "duplicate of an order entered by hand", operator)
	}
	ri, err := store.ReinjectDeadLetter(ctx, res.DeadLetterID, postgres.ReinjectOptions{Reason: "fixed"}, operator)
	var stock *domain.InsufficientStockError
	if errors.As(err, &stock) {
		count("reinject_out_of_stock")
		return nil
	}
	if err != nil {
		return err
	}
	count("reinjected")
	if err := failAttempt(ctx, store, d.ID, ri.IdempotencyKey, 1); err != nil {
		return err
	}
	_, err = store.RecordInvoice(ctx, d.ID, ri.IdempotencyKey, "INV-R-"+ri.IdempotencyKey, meta)
	return err
}

func invoiceRequest(d postgres.DealView, key string) domain.InvoiceRequest {
	return domain.InvoiceRequest{DealID: d.ID, IdempotencyKey: key, CloseVersion: *d.CloseVersion, Customer: d.Customer,
		Currency: d.Currency, Lines: d.Lines, Total: d.Total}
}

func failAttempt(ctx context.Context, store *postgres.Store, dealID, key string, attempt int) error {
	sv, ok, err := store.Saga(ctx, key)
	if err != nil || !ok {
		return fmt.Errorf("saga %s: %v (exists %v)", key, err, ok)
	}
	at := time.Now().UTC().Truncate(time.Microsecond)
	return store.RecordAttemptFailure(ctx, domain.InvoiceAttemptFailed{DealID: dealID, IdempotencyKey: key, Attempt: attempt,
		ErrorClass: domain.ErrorTransient, StatusCode: 503, Message: "ERP unavailable", LatencyMS: 12,
		AttemptedAt: at, NextAttemptAt: at.Add(time.Second)}, sv.Version, meta)
}

func compensate(ctx context.Context, store *postgres.Store, d postgres.DealView, key string, attempts int) (postgres.CompensationResult, error) {
	req := invoiceRequest(d, key)
	b, _ := json.Marshal(req)
	now := time.Now().UTC()
	return store.Compensate(ctx, req, postgres.Failure{ErrorClass: string(domain.ErrorPermanent), Reason: "ERP rejected: customer unknown",
		Attempts: attempts + 1, FirstFailureAt: now, LastFailureAt: now},
		postgres.DeadLetterSource{MessageUUID: fmt.Sprintf("msg-%s", key), Topic: outbox.InvoiceTopic, Handler: "invoice-saga", Payload: b,
			Metadata: map[string]string{"idempotency_key": key}}, meta)
}

func replay(t testing.TB, pool *pgxpool.Pool, opts projections.Options) projections.Report {
	t.Helper()
	rep, err := projections.Replay(t.Context(), pool, opts)
	if err != nil {
		t.Fatalf("replay: %v", err)
	}
	return rep
}

func TestReplayVerifyAfterConcurrentRun(t *testing.T) {
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	counts := simulate(t, store, 120, 8, 1)
	t.Logf("run: %v", counts)
	for _, k := range []string{"invoiced", "raced", "compensated", "reinjected"} {
		if counts[k] == 0 {
			t.Fatalf("the run has no %q deal; the test would prove less than it claims: %v", k, counts)
		}
	}
	rep := replay(t, pool, projections.Options{Verify: true})
	var buf bytes.Buffer
	rep.Format(&buf)
	t.Log("\n" + buf.String())
	if rep.Drift() {
		t.Fatalf("replay differs from live:\n%s", buf.String())
	}
	requireMethod(t, rep, projections.MethodFold)
	var n int64
	if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM events`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if rep.Events != n || n < 500 {
		t.Fatalf("replayed %d events, the log has %d", rep.Events, n)
	}
	for _, tr := range rep.Tables {
		if tr.LiveRows == 0 {
			t.Errorf("table %s is empty: the run did not exercise it", tr.Name)
		}
	}
}

func TestReplayReportsDrift(t *testing.T) {
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	simulate(t, store, 30, 4, 2)
	ctx := t.Context()
	var dealID, alertID string
	if err := pool.QueryRow(ctx, `SELECT id::text FROM deals WHERE status='invoiced' ORDER BY id LIMIT 1`).Scan(&dealID); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT id::text FROM alerts ORDER BY id LIMIT 1`).Scan(&alertID); err != nil {
		t.Fatal(err)
	}
	// Three kinds of drift: a changed row, a row no event produces, a row
	// missing from live.
	mustExec(t, pool, `UPDATE deals SET status='reverted', invoice_number=NULL WHERE id=$1`, dealID)
	mustExec(t, pool, `INSERT INTO inventory (sku, available, allocated, version, updated_at) VALUES ('GHOST', 5, 0, 1, now())`)
	mustExec(t, pool, `DELETE FROM alerts WHERE id=$1`, alertID)

	rep := replay(t, pool, projections.Options{Verify: true})
	var buf bytes.Buffer
	rep.Format(&buf)
	out := buf.String()
	t.Log("\n" + out)
	if !rep.Drift() {
		t.Fatal("drift not detected")
	}
	want := map[string][3]int64{"deals": {1, 0, 0}, "inventory": {0, 1, 0}, "alerts": {0, 0, 1}}
	for _, tr := range rep.Tables {
		w := want[tr.Name]
		if got := [3]int64{tr.Changed, tr.OnlyLive, tr.OnlyRebuilt}; got != w {
			t.Errorf("%s: changed/only live/only rebuilt = %v, want %v", tr.Name, got, w)
		}
	}
	for _, s := range []string{
		"changed id=" + dealID,
		`status: live "reverted", rebuilt "invoiced"`,
		"only in live sku=GHOST",
		"missing from live id=" + alertID,
		"DRIFT",
	} {
		if !strings.Contains(out, s) {
			t.Errorf("report lacks %q", s)
		}
	}
}

// TestReplayFollowsCommitOrderNotPositions builds the interleaving that
// makes position order wrong: T1 (recording the invoice) takes its event
// position, then waits for the saga row that T2 (recording a failed
// attempt) has locked; T2 appends later but commits first. Live ends
// "invoiced"; a replay in position order would end "retrying".
func TestReplayFollowsCommitOrderNotPositions(t *testing.T) {
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	ctx := t.Context()
	if _, err := store.SetInventory(ctx, "SKU-A", 10, meta); err != nil {
		t.Fatal(err)
	}
	d, err := store.CreateDeal(ctx, domain.Customer{ID: "C-1", Name: "Globex"}, "EUR",
		[]domain.Line{{SKU: "SKU-A", Description: "Widget", Quantity: 1, UnitPrice: "10.00"}}, meta)
	if err != nil {
		t.Fatal(err)
	}
	if d, err = store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); err != nil {
		t.Fatal(err)
	}
	key := *d.IdempotencyKey

	t2, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer t2.Rollback(context.Background())
	var sagaVersion int
	if err := t2.QueryRow(ctx, `SELECT version FROM invoice_sagas WHERE idempotency_key=$1 FOR UPDATE`, key).Scan(&sagaVersion); err != nil {
		t.Fatal(err)
	}

	t1, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer t1.Rollback(context.Background())
	recs1, err := postgres.AppendTx(ctx, t1, domain.Change{StreamID: domain.DealStream(d.ID), ExpectedVersion: d.Version,
		Events: []domain.Event{domain.InvoiceCreated{DealID: d.ID, IdempotencyKey: key, InvoiceNumber: "INV-1", Attempts: 2,
			Total: d.Total, Currency: d.Currency}}}, meta)
	if err != nil {
		t.Fatal(err)
	}
	t1done := make(chan error, 1)
	go func() {
		// Blocks on the saga row until T2 commits.
		if err := projections.Apply(ctx, t1, recs1...); err != nil {
			t1done <- err
			return
		}
		t1done <- t1.Commit(ctx)
	}()
	// Let T1 reach the lock wait.
	waitForLockWait(t, pool)

	at := time.Now().UTC().Truncate(time.Microsecond)
	recs2, err := postgres.AppendTx(ctx, t2, domain.Change{StreamID: domain.SagaStream(key), ExpectedVersion: sagaVersion,
		Events: []domain.Event{domain.InvoiceAttemptFailed{DealID: d.ID, IdempotencyKey: key, Attempt: 1,
			ErrorClass: domain.ErrorTransient, Message: "timeout", AttemptedAt: at, NextAttemptAt: at.Add(time.Second)}}}, meta)
	if err != nil {
		t.Fatal(err)
	}
	if err := projections.Apply(ctx, t2, recs2...); err != nil {
		t.Fatal(err)
	}
	if err := t2.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-t1done; err != nil {
		t.Fatal(err)
	}
	if recs1[0].Position > recs2[0].Position {
		t.Fatalf("the interleaving did not happen: positions %d, %d", recs1[0].Position, recs2[0].Position)
	}
	if st, _, err := store.InvoiceState(ctx, key); err != nil || st != domain.SagaInvoiced {
		t.Fatalf("live saga state %q (%v), want invoiced", st, err)
	}
	rep := replay(t, pool, projections.Options{Verify: true})
	if rep.Drift() {
		var buf bytes.Buffer
		rep.Format(&buf)
		t.Fatalf("replay differs from live:\n%s", buf.String())
	}
}

// waitForLockWait waits until some backend waits for a row lock.
func waitForLockWait(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var n int
		if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("no transaction waits for a lock")
}

func TestReplaySwapRepairsLiveWhileWritersRun(t *testing.T) {
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	simulate(t, store, 40, 4, 3)
	ctx := t.Context()
	// Damage that no later command bases a decision on (a tampered stock
	// level would make the writers below allocate stock the log does not
	// have, and the log itself would then be inconsistent).
	mustExec(t, pool, `UPDATE inventory SET updated_at = updated_at - interval '1 day' WHERE sku='SKU-A'`)
	mustExec(t, pool, `UPDATE alerts SET message = 'tampered' WHERE id = (SELECT id FROM alerts ORDER BY id LIMIT 1)`)
	mustExec(t, pool, `DELETE FROM deals WHERE id = (SELECT id FROM deals WHERE status IN ('lost', 'invoiced') ORDER BY id LIMIT 1)`)
	if rep := replay(t, pool, projections.Options{Verify: true}); !rep.Drift() {
		t.Fatal("the damage is not seen")
	}

	// Writers keep committing while the swap runs: the events committed
	// after the replay's snapshot must be caught up, not lost.
	wctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var written atomic.Int64
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(99, uint64(w)))
			for wctx.Err() == nil {
				if err := oneDeal(wctx, store, rng, func(string) {}); err != nil {
					if wctx.Err() == nil {
						t.Errorf("writer: %v", err)
					}
					return
				}
				written.Add(1)
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)
	rep := replay(t, pool, projections.Options{Swap: true})
	time.Sleep(50 * time.Millisecond)
	cancel()
	wg.Wait()
	if !rep.Swapped {
		t.Fatal("not swapped")
	}
	t.Logf("swap caught up %d events; writers made %d deals", rep.CaughtUp, written.Load())
	if written.Load() == 0 {
		t.Fatal("no writer made progress")
	}
	after := replay(t, pool, projections.Options{Verify: true})
	if after.Drift() {
		var buf bytes.Buffer
		after.Format(&buf)
		t.Fatalf("after the swap, live still differs:\n%s", buf.String())
	}
}

func mustExec(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	if _, err := pool.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}
