package queue_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/queue"
)

// deleteCounter counts the work-queue deletes a pool sends.
type deleteCounter struct{ n atomic.Int64 }

func (c *deleteCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if strings.HasPrefix(d.SQL, "DELETE FROM work_queue") {
		c.n.Add(1)
	}
	return ctx
}

func (c *deleteCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// TestAckTxCommittedSkipsTheDelete: once the handler confirms that its
// AckTx transaction committed, the Ack sends no delete of its own; without
// the confirmation (the positive control) it still deletes, fenced.
func TestAckTxCommittedSkipsTheDelete(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := t.Context()
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	deletes := &deleteCounter{}
	cfg.ConnConfig.Tracer = deletes
	subPool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(subPool.Close)
	pool := newPool(t, dbURL, "wq-acktx-committed", 2)

	topic := "acktx-committed"
	confirmed, unconfirmed := newMsg("confirmed"), newMsg("unconfirmed")
	publish(t, newPublisher(t, pool), topic, confirmed, unconfirmed)
	sub := newSubscriber(t, subPool, queue.SubscriberConfig{Consumers: 1})
	ch, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	// One consumer: the second message is delivered only once the first
	// one's Ack has run to its end.
	ackInTx := func(m *message.Message, confirm bool) {
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := queue.AckTx(ctx, tx, m); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		if confirm {
			queue.AckTxCommitted(m)
		}
		m.Ack()
	}
	m := receive(t, ch, 5*time.Second)
	if m.UUID != confirmed.UUID {
		t.Fatalf("got message %s first, want %s", m.Payload, confirmed.Payload)
	}
	ackInTx(m, true)
	m = receive(t, ch, 5*time.Second)
	if got := deletes.n.Load(); got != 0 {
		t.Errorf("the Ack of a confirmed AckTx sent %d delete(s), want none", got)
	}
	ackInTx(m, false)
	eventually(t, 5*time.Second, "the Ack of an unconfirmed AckTx to send its fenced delete", func() bool {
		return deletes.n.Load() == 1
	})
}
