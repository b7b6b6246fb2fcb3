package queue_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// testLogger logs warnings and errors to stderr: enough to diagnose a
// failure without drowning the suite's output.
func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// newPool opens a pool on dbURL whose connections carry application_name
// app (so pg_stat_activity can pick them out), closed at cleanup.
func newPool(t testing.TB, dbURL, app string, maxConns int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = maxConns
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// newSubscriber returns a Subscriber closed at cleanup (before its pool, if
// the pool was opened earlier in the same test).
func newSubscriber(t testing.TB, pool *pgxpool.Pool, cfg queue.SubscriberConfig) *queue.Subscriber {
	t.Helper()
	sub, err := queue.NewSubscriber(pool, cfg, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sub.Close(); err != nil {
			t.Error(err)
		}
	})
	return sub
}

func newPublisher(t testing.TB, pool *pgxpool.Pool) *queue.Publisher {
	t.Helper()
	pub, err := queue.NewPublisher(pool, queue.PublisherConfig{}, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func publish(t testing.TB, pub message.Publisher, topic string, msgs ...*message.Message) {
	t.Helper()
	if err := pub.Publish(topic, msgs...); err != nil {
		t.Fatal(err)
	}
}

func newMsg(payload string) *message.Message {
	return message.NewMessage(watermill.NewUUID(), []byte(payload))
}

// receive waits up to timeout for one message.
func receive(t testing.TB, ch <-chan *message.Message, timeout time.Duration) *message.Message {
	t.Helper()
	select {
	case m, ok := <-ch:
		if !ok {
			t.Fatal("messages channel closed")
		}
		return m
	case <-time.After(timeout):
		t.Fatalf("no message within %s", timeout)
		return nil
	}
}

// expectNone fails if a message arrives within d.
func expectNone(t testing.TB, ch <-chan *message.Message, d time.Duration) {
	t.Helper()
	select {
	case m := <-ch:
		t.Fatalf("unexpected message %s (attempt %d)", m.UUID, queue.Attempt(m))
	case <-time.After(d):
	}
}

// eventually polls cond every 20ms until it holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type queueRow struct {
	attempts  int
	leased    bool
	delayed   time.Duration // available_at - now(), on the database clock
	lastError string
	token     string
}

// readRow reads the work_queue row of message uuid; ok is false if there is
// none (acked).
func readRow(t testing.TB, pool *pgxpool.Pool, uuid string) (r queueRow, ok bool) {
	t.Helper()
	var delayedUS int64
	err := pool.QueryRow(context.Background(), `
SELECT attempts, COALESCE(lease_until > now(), false), EXTRACT(EPOCH FROM available_at - now()) * 1e6,
       last_error, COALESCE(claim_token::text, '')
FROM work_queue WHERE uuid = $1`, uuid).
		Scan(&r.attempts, &r.leased, &delayedUS, &r.lastError, &r.token)
	if err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return r, false
		}
		t.Fatal(err)
	}
	r.delayed = time.Duration(delayedUS) * time.Microsecond
	return r, true
}
