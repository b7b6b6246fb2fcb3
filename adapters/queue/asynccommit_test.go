package queue_test

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/queue"
)

// TestClaimAsyncCommitStaysInTheClaim: a claim commits without waiting for
// the WAL flush (synchronous_commit=off local to its implicit
// transaction), and the setting does not leak to the next statement on
// the same pooled connection: a store sharing the pool (the all-in-one dev
// mode) must keep committing synchronously. The control shows the
// transaction-local setting does take effect inside such a batch.
func TestClaimAsyncCommitStaysInTheClaim(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := t.Context()
	// The test clusters run with synchronous_commit=off: this database's
	// sessions start with it on, as on a production server.
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	_, err = conn.Exec(ctx, `DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = on', current_database()); END $$`)
	_ = conn.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pool := newPool(t, dbURL, "wq-async", 1) // one connection: the claim's
	publish(t, newPublisher(t, pool), "async", newMsg("a"))
	sub := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 1})
	ch, err := sub.Subscribe(ctx, "async")
	if err != nil {
		t.Fatal(err)
	}
	m := receive(t, ch, 5*time.Second)
	m.Ack()
	<-m.Context().Done()

	show := func() string {
		var v string
		if err := pool.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if v := show(); v != "on" {
		t.Fatalf("after a claim the pooled connection has synchronous_commit=%q, want on", v)
	}
	// Control: the claim's form (BEGIN; SET LOCAL …; …; COMMIT in one
	// batch) does switch the setting inside, and only there.
	var b pgx.Batch
	var inside string
	b.Queue(`BEGIN`)
	b.Queue(`SET LOCAL synchronous_commit = off`)
	b.Queue(`SHOW synchronous_commit`).QueryRow(func(r pgx.Row) error { return r.Scan(&inside) })
	b.Queue(`COMMIT`)
	if err := pool.SendBatch(ctx, &b).Close(); err != nil {
		t.Fatal(err)
	}
	if inside != "off" {
		t.Errorf("control: inside the batch synchronous_commit is %q, want off", inside)
	}
	if v := show(); v != "on" {
		t.Errorf("control: after the batch synchronous_commit is %q, want on", v)
	}
}
