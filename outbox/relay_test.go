package outbox_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/outbox"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

const (
	gapTopic     = "gap-test"
	producers    = 40
	waitDeadline = 20 * time.Second
)

// newPool opens a pool on a fresh migrated database, large enough for every
// producer to hold its own transaction at once (the pgxpool default of
// max(4, NumCPU) would serialise them and hide the interleavings).
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

// recorder is a message.Publisher that records the UUIDs it was given. While
// fail returns an error for a message, Publish fails for it (and records the
// failed attempt) without recording a delivery.
type recorder struct {
	mu       sync.Mutex
	order    []string       // successful deliveries, in order
	seen     map[string]int // successful deliveries per UUID
	failures map[string]int // failed attempts per UUID
	fail     func(uuid string) bool
}

func newRecorder() *recorder {
	return &recorder{seen: map[string]int{}, failures: map[string]int{}}
}

var _ message.Publisher = (*recorder)(nil)

func (r *recorder) Publish(_ string, msgs ...*message.Message) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range msgs {
		if r.fail != nil && r.fail(m.UUID) {
			r.failures[m.UUID]++
			return fmt.Errorf("target unavailable for %s", m.UUID)
		}
		r.order = append(r.order, m.UUID)
		r.seen[m.UUID]++
	}
	return nil
}

func (r *recorder) Close() error { return nil }

func (r *recorder) setFail(f func(string) bool) {
	r.mu.Lock()
	r.fail = f
	r.mu.Unlock()
}

func (r *recorder) record(uuid string) {
	r.mu.Lock()
	r.order = append(r.order, uuid)
	r.seen[uuid]++
	r.mu.Unlock()
}

func (r *recorder) delivered(uuid string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen[uuid] > 0
}

func (r *recorder) failed(uuid string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failures[uuid]
}

func (r *recorder) deliveries() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.order)
}

// missing returns the UUIDs of want not delivered yet.
func (r *recorder) missing(want []string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, u := range want {
		if r.seen[u] == 0 {
			out = append(out, u)
		}
	}
	return out
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		select {
		case <-tick.C:
		case <-t.Context().Done():
			t.Fatalf("test context done waiting for %s", what)
		}
	}
}

// startRelay runs a real outbox.Relay into target until the returned stop
// function (also run at cleanup) closes it.
func startRelay(t *testing.T, pool *pgxpool.Pool, target message.Publisher, cfg outbox.RelayConfig) (stop func()) {
	t.Helper()
	relay, err := outbox.NewRelay(pool, target, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- relay.Run(context.Background()) }()
	select {
	case <-relay.Running():
	case err := <-done:
		t.Fatalf("relay stopped before running: %v", err)
	case <-time.After(waitDeadline):
		t.Fatal("relay did not start")
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			if err := relay.Close(); err != nil {
				t.Errorf("relay close: %v", err)
			}
			if err := <-done; err != nil {
				t.Errorf("relay run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func newMessage() *message.Message {
	return message.NewMessage(watermill.NewUUID(), []byte(`{"n":1}`))
}

// publishCommitted writes one message to the outbox in its own committed
// transaction and returns its UUID.
func publishCommitted(ctx context.Context, pool *pgxpool.Pool) (string, error) {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return "", err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	m := newMessage()
	if err := outbox.PublishTx(ctx, tx, gapTopic, m); err != nil {
		return "", err
	}
	return m.UUID, tx.Commit(ctx)
}

// load is what the producers did: the UUIDs whose transaction committed and
// those whose transaction rolled back.
type load struct {
	mu         sync.Mutex
	committed  []string
	rolledBack []string
}

func (l *load) add(uuid string, committed bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if committed {
		l.committed = append(l.committed, uuid)
	} else {
		l.rolledBack = append(l.rolledBack, uuid)
	}
}

// produce runs n producers at once. Each writes one message with
// outbox.PublishTx in its own transaction, holds the transaction open for a
// random 0–50ms (so sequence values commit out of order) and then commits,
// or rolls back for every fifth producer.
func produce(ctx context.Context, pool *pgxpool.Pool, n int, l *load) error {
	g, ctx := errgroup.WithContext(ctx)
	for i := range n {
		g.Go(func() error {
			tx, err := pool.Begin(ctx)
			if err != nil {
				return err
			}
			defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
			m := newMessage()
			if err := outbox.PublishTx(ctx, tx, gapTopic, m); err != nil {
				return err
			}
			time.Sleep(rand.N(51 * time.Millisecond)) // the transaction's own work
			if i%5 == 0 {
				if err := tx.Rollback(ctx); err != nil {
					return err
				}
				l.add(m.UUID, false)
				return nil
			}
			if err := tx.Commit(ctx); err != nil {
				return err
			}
			l.add(m.UUID, true)
			return nil
		})
	}
	return g.Wait()
}

// forceLateCommit builds the interleaving that a relay polling
// `"offset" > last` gets wrong, with no timing involved:
//
//  1. C begins and takes its transaction id first;
//  2. A writes its message (offset oA);
//  3. B writes its message (oB > oA) and commits;
//  4. C writes its message (oC > oB) and commits;
//  5. observe(C) returns once the relay under test has seen C, which
//     proves it read the outbox after B and C committed and before A did;
//  6. A commits: its row has the lowest offset of the three, and commits last.
//
// It returns A's, B's and C's UUIDs (all committed).
func forceLateCommit(ctx context.Context, pool *pgxpool.Pool, observe func(cUUID string) error) (a, b, c string, err error) {
	txC, err := pool.Begin(ctx)
	if err != nil {
		return "", "", "", err
	}
	defer func() { _ = txC.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := txC.Exec(ctx, `SELECT pg_current_xact_id()`); err != nil {
		return "", "", "", err
	}
	txA, err := pool.Begin(ctx)
	if err != nil {
		return "", "", "", err
	}
	defer func() { _ = txA.Rollback(context.WithoutCancel(ctx)) }()
	ma := newMessage()
	if err := outbox.PublishTx(ctx, txA, gapTopic, ma); err != nil {
		return "", "", "", err
	}
	if b, err = publishCommitted(ctx, pool); err != nil {
		return "", "", "", err
	}
	mc := newMessage()
	if err := outbox.PublishTx(ctx, txC, gapTopic, mc); err != nil {
		return "", "", "", err
	}
	if err := txC.Commit(ctx); err != nil {
		return "", "", "", err
	}
	if err := observe(mc.UUID); err != nil {
		return "", "", "", fmt.Errorf("observe C: %w", err)
	}
	if err := txA.Commit(ctx); err != nil {
		return "", "", "", err
	}
	return ma.UUID, b, mc.UUID, nil
}

// waitDelivered returns an observe function for forceLateCommit that waits
// until rec has received uuid.
func waitDelivered(ctx context.Context, rec *recorder) func(string) error {
	return func(uuid string) error {
		ctx, cancel := context.WithTimeout(ctx, waitDeadline)
		defer cancel()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for !rec.delivered(uuid) {
			select {
			case <-tick.C:
			case <-ctx.Done():
				return fmt.Errorf("%s not delivered: %w", uuid, ctx.Err())
			}
		}
		return nil
	}
}

// TestRelayIsGapSafe (I2, F17): under concurrent producers whose
// transactions commit out of offset order, the real relay delivers every
// committed message and no rolled-back one, including the message of a
// transaction that commits after the relay has already delivered messages
// with higher offsets.
func TestRelayIsGapSafe(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, producers+10)
	rec := newRecorder()
	startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})

	var l load
	var late string
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return produce(gctx, pool, producers, &l) })
	g.Go(func() error {
		a, b, c, err := forceLateCommit(gctx, pool, waitDelivered(gctx, rec))
		if err == nil {
			late = a
			for _, u := range []string{a, b, c} {
				l.add(u, true)
			}
		}
		return err
	})
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	if len(l.committed) != producers-producers/5+3 || len(l.rolledBack) != producers/5 {
		t.Fatalf("load: %d committed, %d rolled back", len(l.committed), len(l.rolledBack))
	}

	waitFor(t, waitDeadline, "every committed message delivered", func() bool {
		return len(rec.missing(l.committed)) == 0
	})
	if !rec.delivered(late) {
		t.Fatalf("late-committing message %s not delivered", late)
	}
	for _, u := range l.rolledBack {
		if rec.delivered(u) {
			t.Errorf("rolled-back message %s was delivered", u)
		}
	}
	t.Logf("delivered %d committed messages (%d deliveries), none of %d rolled back",
		len(l.committed), len(rec.deliveries()), len(l.rolledBack))
}

// naiveRelay is the positive control: the relay the design forbids, which
// polls `"offset" > last` and advances last to the highest offset it saw.
type naiveRelay struct {
	pool *pgxpool.Pool
	rec  *recorder
	mu   sync.Mutex
	last int64
}

// poll reads every row above last and "delivers" it.
func (n *naiveRelay) poll(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	rows, err := n.pool.Query(ctx, `SELECT "offset", uuid, payload::text FROM watermill_outbox WHERE "offset" > $1 ORDER BY "offset"`, n.last)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var (
			off           int64
			rowUUID, body string
		)
		if err := rows.Scan(&off, &rowUUID, &body); err != nil {
			return err
		}
		// The row's uuid is the forwarder envelope's; the message's own
		// UUID is inside the envelope.
		var env struct {
			UUID string `json:"uuid"`
		}
		if err := json.Unmarshal([]byte(body), &env); err != nil {
			return fmt.Errorf("row %d (%s): %w", off, rowUUID, err)
		}
		n.rec.record(env.UUID)
		n.last = max(n.last, off)
	}
	return rows.Err()
}

// TestNaiveRelayLosesMessages is the positive control of
// TestRelayIsGapSafe: the same load, read by a relay that polls
// `"offset" > last`, loses messages. The forced interleaving makes at least
// one loss certain; the random load usually adds more.
func TestNaiveRelayLosesMessages(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, producers+10)
	rec := newRecorder()
	naive := &naiveRelay{pool: pool, rec: rec}

	loopCtx, stopLoop := context.WithCancel(ctx)
	loopDone := make(chan error, 1)
	go func() {
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-loopCtx.Done():
				loopDone <- nil
				return
			case <-tick.C:
				if err := naive.poll(loopCtx); err != nil && loopCtx.Err() == nil {
					loopDone <- err
					return
				}
			}
		}
	}()

	var l load
	var late string
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return produce(gctx, pool, producers, &l) })
	g.Go(func() error {
		a, b, c, err := forceLateCommit(gctx, pool, func(string) error { return naive.poll(gctx) })
		if err == nil {
			late = a
			for _, u := range []string{a, b, c} {
				l.add(u, true)
			}
		}
		return err
	})
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	stopLoop()
	if err := <-loopDone; err != nil {
		t.Fatalf("naive relay: %v", err)
	}
	// Everything has committed: one more poll reads all the naive relay
	// will ever read.
	if err := naive.poll(ctx); err != nil {
		t.Fatal(err)
	}

	missing := rec.missing(l.committed)
	if len(missing) == 0 {
		t.Fatal("the naive relay delivered every committed message: the positive control cannot see loss")
	}
	if !slices.Contains(missing, late) {
		t.Errorf("the forced late commit %s was delivered by the naive relay", late)
	}
	for _, u := range l.rolledBack {
		if rec.delivered(u) {
			t.Errorf("rolled-back message %s was delivered", u)
		}
	}
	t.Logf("naive relay missed %d of %d committed messages (1 forced, %d under random load)",
		len(missing), len(l.committed), len(missing)-1)
}

// outboxOffsets maps each message UUID (inside its envelope) to its
// outbox offset.
func outboxOffsets(t *testing.T, pool *pgxpool.Pool) map[string]int64 {
	t.Helper()
	rows, err := pool.Query(t.Context(), `SELECT "offset", payload::text FROM watermill_outbox`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var (
			off  int64
			body string
			env  struct {
				DestinationTopic string `json:"destination_topic"`
				UUID             string `json:"uuid"`
			}
		)
		if err := rows.Scan(&off, &body); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal([]byte(body), &env); err != nil {
			t.Fatal(err)
		}
		if env.DestinationTopic != gapTopic {
			t.Fatalf("envelope destination %q, want %q", env.DestinationTopic, gapTopic)
		}
		out[env.UUID] = off
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// ackedOffset is the relay's committed offset.
func ackedOffset(t *testing.T, pool *pgxpool.Pool) int64 {
	t.Helper()
	var off int64
	err := pool.QueryRow(t.Context(), `SELECT coalesce(max(offset_acked), 0) FROM watermill_offsets_outbox WHERE consumer_group=$1`,
		outbox.ConsumerGroup).Scan(&off)
	if err != nil {
		t.Fatal(err)
	}
	return off
}

// publishSequence commits n messages, each in its own transaction, in
// order, and returns their UUIDs.
func publishSequence(t *testing.T, pool *pgxpool.Pool, n int) []string {
	t.Helper()
	out := make([]string, n)
	for i := range out {
		u, err := publishCommitted(t.Context(), pool)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = u
	}
	return out
}

// TestRelayStopsAtFailedPublishAndResumes: when the target fails for a
// message, the relay neither delivers nor acknowledges anything after it;
// once the target recovers, everything is delivered, in order.
func TestRelayStopsAtFailedPublishAndResumes(t *testing.T) {
	t.Parallel()
	pool := newPool(t, 8)
	msgs := publishSequence(t, pool, 10)
	offsets := outboxOffsets(t, pool)
	const bad = 4
	rec := newRecorder()
	rec.setFail(func(u string) bool { return u == msgs[bad] })
	startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})

	// Two failed attempts: the relay retried the message instead of
	// skipping it (the resend interval is 1s).
	waitFor(t, waitDeadline, "two failed publishes of the bad message", func() bool { return rec.failed(msgs[bad]) >= 2 })
	if got := rec.deliveries(); !slices.Equal(got, msgs[:bad]) {
		t.Fatalf("while the target fails on message %d: delivered %v, want exactly %v", bad, got, msgs[:bad])
	}
	if off := ackedOffset(t, pool); off >= offsets[msgs[bad]] {
		t.Fatalf("acked offset %d reaches the failing message's offset %d", off, offsets[msgs[bad]])
	}

	rec.setFail(nil)
	waitFor(t, waitDeadline, "every message delivered after recovery", func() bool { return len(rec.missing(msgs)) == 0 })
	// At-least-once allows a repeat; the first deliveries are in order.
	if got := firstDeliveries(rec.deliveries()); !slices.Equal(got, msgs) {
		t.Fatalf("first deliveries %v, want %v", got, msgs)
	}
	last := offsets[msgs[len(msgs)-1]]
	waitFor(t, waitDeadline, "the relay to ack the last offset", func() bool { return ackedOffset(t, pool) == last })
}

// firstDeliveries keeps the first delivery of each UUID, in order.
func firstDeliveries(order []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, u := range order {
		if !seen[u] {
			seen[u] = true
			out = append(out, u)
		}
	}
	return out
}

// pgTarget is a Postgres target publisher that writes through the relay's
// own transaction (wsql.TxFromContext), as the work queue does: publish
// and offset commit together.
type pgTarget struct {
	mu       sync.Mutex
	failUUID string
	failures int
}

func (p *pgTarget) Publish(_ string, msgs ...*message.Message) error {
	for _, m := range msgs {
		p.mu.Lock()
		fail := m.UUID == p.failUUID
		if fail {
			p.failures++
		}
		p.mu.Unlock()
		if fail {
			return fmt.Errorf("target refuses %s", m.UUID)
		}
		tx, ok := wsql.TxFromContext(m.Context())
		if !ok {
			return errors.New("no relay transaction in the message context")
		}
		if _, err := tx.ExecContext(m.Context(), `INSERT INTO relay_target (uuid) VALUES ($1)`, m.UUID); err != nil {
			return err
		}
	}
	return nil
}

func (p *pgTarget) Close() error { return nil }

func (p *pgTarget) failed() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failures
}

// TestRelayOffsetAndPostgresPublishAreAtomic: with a Postgres target the
// relay's offset and the target's writes commit together. A relay stopped
// while the target refuses a message leaves exactly the acked prefix in the
// target; a new relay delivers the rest, each message exactly once.
func TestRelayOffsetAndPostgresPublishAreAtomic(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 8)
	if _, err := pool.Exec(ctx, `CREATE TABLE relay_target (id bigserial PRIMARY KEY, uuid text NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	msgs := publishSequence(t, pool, 10)
	offsets := outboxOffsets(t, pool)
	const bad = 6
	target := &pgTarget{failUUID: msgs[bad]}
	stop := startRelay(t, pool, target, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})
	waitFor(t, waitDeadline, "a failed publish of the bad message", func() bool { return target.failed() >= 1 })
	stop()

	targetRows := func() []string {
		rows, err := pool.Query(ctx, `SELECT uuid FROM relay_target ORDER BY id`)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for rows.Next() {
			var u string
			if err := rows.Scan(&u); err != nil {
				t.Fatal(err)
			}
			out = append(out, u)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return out
	}
	acked := ackedOffset(t, pool)
	if acked >= offsets[msgs[bad]] {
		t.Fatalf("acked offset %d reaches the refused message's offset %d", acked, offsets[msgs[bad]])
	}
	var ackedPrefix []string
	for _, u := range msgs {
		if offsets[u] <= acked {
			ackedPrefix = append(ackedPrefix, u)
		}
	}
	if got := targetRows(); !slices.Equal(got, ackedPrefix) {
		t.Fatalf("after stop: target holds %v, but the acked offset %d covers %v", got, acked, ackedPrefix)
	}

	startRelay(t, pool, &pgTarget{}, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})
	waitFor(t, waitDeadline, "every message in the target", func() bool { return len(targetRows()) >= len(msgs) })
	last := offsets[msgs[len(msgs)-1]]
	waitFor(t, waitDeadline, "the relay to ack the last offset", func() bool { return ackedOffset(t, pool) == last })
	if got := targetRows(); !slices.Equal(got, msgs) {
		t.Fatalf("target holds %v, want each message once, in order: %v", got, msgs)
	}
}

// TestRelayWakesOnNotify: with a poll interval of an hour, rows committed to
// an idle relay are relayed because the Notifier's NOTIFY after the commit
// wakes it — each of several rows, one after another, and a burst from
// concurrent writers whose notifications coalesce.
func TestRelayWakesOnNotify(t *testing.T) {
	ctx := t.Context()
	pool := newPool(t, 8)
	rec := newRecorder()
	n := outbox.NewNotifier(pool, nil)
	startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: time.Hour})
	for i := range 3 {
		time.Sleep(300 * time.Millisecond) // the relay settles into its idle wait
		start := time.Now()
		uuid, err := publishCommitted(ctx, pool)
		if err != nil {
			t.Fatal(err)
		}
		n.Notify(ctx)
		waitFor(t, 20*time.Second, "the notified relay to deliver "+uuid, func() bool { return rec.delivered(uuid) })
		t.Logf("row %d relayed %v after its commit", i+1, time.Since(start).Round(time.Millisecond))
	}
	time.Sleep(300 * time.Millisecond)
	var (
		mu    sync.Mutex
		burst []string
		wg    sync.WaitGroup
	)
	for range 8 {
		wg.Go(func() {
			for range 10 {
				uuid, err := publishCommitted(ctx, pool)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				burst = append(burst, uuid)
				mu.Unlock()
				n.Notify(ctx)
			}
		})
	}
	wg.Wait()
	waitFor(t, 20*time.Second, "a burst of 80 rows from 8 writers", func() bool { return len(rec.missing(burst)) == 0 })
}

// TestRelayPollsWithoutNotify: NOTIFY is only a wake-up. Without it (as if
// every notification were lost) the relay still delivers, by polling.
func TestRelayPollsWithoutNotify(t *testing.T) {
	ctx := t.Context()
	pool := newPool(t, 8)
	rec := newRecorder()
	startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: 200 * time.Millisecond})
	time.Sleep(300 * time.Millisecond)
	uuid, err := publishCommitted(ctx, pool)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the polling relay to deliver "+uuid, func() bool { return rec.delivered(uuid) })
}

// TestRelayStoppedWhileStarting: cancelling the context while the relay is
// still subscribing is a clean shutdown, not an error (a process sent
// SIGTERM right after start must exit 0).
func TestRelayStoppedWhileStarting(t *testing.T) {
	pool := newPool(t, 4)
	for i := range 20 {
		relay, err := outbox.NewRelay(pool, newRecorder(), outbox.RelayConfig{}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- relay.Run(ctx) }()
		time.Sleep(time.Duration(i%5) * time.Millisecond)
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("run %d: relay stopped while starting returned %v, want nil", i, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("run %d: relay did not stop", i)
		}
	}
}
