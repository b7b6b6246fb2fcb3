package queue_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/dealbridge/dealbridge/adapters/queue"
)

// relayOutbox subscribes to a watermill-sql "outbox" topic through a
// DeferringBeginner, as the relay does, with one batch of up to 100 rows
// per transaction.
func relayOutbox(t *testing.T, dbURL string, msgs ...*message.Message) <-chan *message.Message {
	t.Helper()
	pool := newPool(t, dbURL, "wq-deferring-relay", 6)
	wlog := watermill.NewSlogLogger(testLogger())
	outboxPub, err := wsql.NewPublisher(wsql.BeginnerFromPgx(pool), wsql.PublisherConfig{SchemaAdapter: wsql.DefaultPostgreSQLSchema{}}, wlog)
	if err != nil {
		t.Fatal(err)
	}
	if err := outboxPub.Publish("outbox", msgs...); err != nil {
		t.Fatal(err)
	}
	sub, err := wsql.NewSubscriber(queue.DeferringBeginner(wsql.BeginnerFromPgx(pool)), wsql.SubscriberConfig{
		ConsumerGroup:  "relay",
		SchemaAdapter:  wsql.DefaultPostgreSQLSchema{SubscribeBatchSize: 100},
		OffsetsAdapter: wsql.DefaultPostgreSQLOffsetsAdapter{},
		PollInterval:   20 * time.Millisecond,
		RetryInterval:  50 * time.Millisecond,
	}, wlog)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sub.Close(); err != nil {
			t.Error(err)
		}
	})
	ch, err := sub.Subscribe(context.Background(), "outbox")
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// forward publishes m's payload to the work queue topic "saga" inside m's
// transaction, with ordering key key, and acks m.
func forward(t *testing.T, wq message.Publisher, m *message.Message, key string) error {
	t.Helper()
	if tx, _ := wsql.TxFromContext(m.Context()); tx == nil {
		t.Fatal("no watermill-sql transaction in the message context")
	} else if _, ok := tx.(*queue.DeferringTx); !ok {
		t.Fatalf("the subscription's transaction is a %T, not a *queue.DeferringTx", tx)
	}
	w := message.NewMessage(m.UUID, m.Payload)
	queue.SetOrderingKey(w, key)
	w.SetContext(m.Context())
	err := wq.Publish("saga", w)
	m.Ack()
	return err
}

// TestDeferringTransactionEnqueuesABatchAtItsOffsetUpdate: in a
// subscription's transaction from a DeferringBeginner, a Publish to the
// work queue holds its insert: an insert that will fail (a trigger refuses
// the payload "boom") is not reported by Publish, but by the offset update
// that carries the held inserts, which rolls the whole batch back, the
// inserts before it included. Once the trigger is gone the batch is
// relayed again and every message is enqueued exactly once, in order.
func TestDeferringTransactionEnqueuesABatchAtItsOffsetUpdate(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-deferring", 4)
	ctx := t.Context()
	if _, err := pool.Exec(ctx, `
		CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.payload = convert_to('"boom"', 'UTF8') THEN RAISE EXCEPTION 'boom refused'; END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER refuse_boom BEFORE INSERT ON work_queue FOR EACH ROW EXECUTE FUNCTION refuse_boom();`); err != nil {
		t.Fatal(err)
	}
	payloads := []string{`"first"`, `"second"`, `"boom"`, `"last"`} // the outbox's payload column is JSON
	var msgs []*message.Message
	for _, p := range payloads {
		msgs = append(msgs, newMsg(p))
	}
	wq := newPublisher(t, pool)
	relayed := relayOutbox(t, dbURL, msgs...)

	for i, p := range payloads {
		m := receive(t, relayed, 5*time.Second)
		if string(m.Payload) != p {
			t.Fatalf("message %d is %q, want %q", i, m.Payload, p)
		}
		// Two keys: the held advisory locks and inserts go out together.
		if err := forward(t, wq, m, []string{"deal-a", "deal-b"}[i%2]); err != nil {
			t.Fatalf("Publish of %q reported %v; a held insert fails at the flush, not here", p, err)
		}
	}
	// The offset update failed with the insert of "boom": nothing of the
	// batch committed, and the batch comes again from its first message.
	m := receive(t, relayed, 5*time.Second)
	if string(m.Payload) != payloads[0] {
		t.Fatalf("after the failed batch the relay resumed at %s, want %s", m.Payload, payloads[0])
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM work_queue`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("%d rows enqueued by a batch whose offset update failed", n)
	}
	m.Nack() // redelivered in the same transaction; the trigger goes first
	if _, err := pool.Exec(ctx, `DROP TRIGGER refuse_boom ON work_queue`); err != nil {
		t.Fatal(err)
	}
	for i, p := range payloads {
		m := receive(t, relayed, 5*time.Second)
		if string(m.Payload) != p {
			t.Fatalf("retry: message %d is %q, want %q", i, m.Payload, p)
		}
		if err := forward(t, wq, m, []string{"deal-a", "deal-b"}[i%2]); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	eventually(t, 5*time.Second, "the batch enqueued", func() bool {
		rows, err := pool.Query(ctx, `SELECT convert_from(payload, 'UTF8') FROM work_queue ORDER BY id`)
		if err != nil {
			t.Fatal(err)
		}
		got = got[:0]
		for rows.Next() {
			var s string
			if err := rows.Scan(&s); err != nil {
				t.Fatal(err)
			}
			got = append(got, s)
		}
		return rows.Err() == nil && len(got) == len(payloads)
	})
	if !slices.Equal(got, payloads) {
		t.Fatalf("enqueued %q, want %q", got, payloads)
	}
	expectNone(t, relayed, 300*time.Millisecond) // the offset moved with the inserts
}

// TestDeferringTransactionWithAFailedFlushCommitsNothing: a flush that
// fails before anything reached the server (its context is done: a
// handler past its deadline) fails the transaction for good: the offset
// update after it does not commit, and the batch comes again.
func TestDeferringTransactionWithAFailedFlushCommitsNothing(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-deferring-fail", 4)
	payloads := []string{`"one"`, `"two"`}
	wq := newPublisher(t, pool)
	relayed := relayOutbox(t, dbURL, newMsg(payloads[0]), newMsg(payloads[1]))

	m := receive(t, relayed, 5*time.Second)
	if err := forward(t, wq, m, "deal-a"); err != nil {
		t.Fatal(err)
	}
	m = receive(t, relayed, 5*time.Second)
	tx, _ := wsql.TxFromContext(m.Context())
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := queue.PgxTxOf(done, tx); err == nil {
		t.Fatal("a flush with a done context succeeded")
	}
	if err := forward(t, wq, m, "deal-b"); err == nil {
		t.Fatal("a publish into a transaction whose flush failed was accepted")
	}
	// The offset update fails: the batch comes again, from its start.
	m = receive(t, relayed, 5*time.Second)
	if string(m.Payload) != payloads[0] {
		t.Fatalf("after the failed flush the relay resumed at %s, want %s: the offset moved without the held insert", m.Payload, payloads[0])
	}
	var n int
	if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM work_queue`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("%d rows enqueued by a transaction whose flush failed", n)
	}
	if err := forward(t, wq, m, "deal-a"); err != nil {
		t.Fatal(err)
	}
	if err := forward(t, wq, receive(t, relayed, 5*time.Second), "deal-b"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "both enqueued", func() bool {
		err := pool.QueryRow(t.Context(), `SELECT count(*) FROM work_queue`).Scan(&n)
		return err == nil && n == 2
	})
	expectNone(t, relayed, 300*time.Millisecond)
}

// TestUndoHeldOnErrorDropsTheInsertOfANackedMessage: watermill-sql
// redelivers a nacked message in the same transaction; the insert its
// first handling held is dropped, so it is enqueued once.
func TestUndoHeldOnErrorDropsTheInsertOfANackedMessage(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-deferring-undo", 4)
	wq := newPublisher(t, pool)
	relayed := relayOutbox(t, dbURL, newMsg(`"once"`))
	calls := 0
	h := queue.UndoHeldOnError(func(m *message.Message) ([]*message.Message, error) {
		calls++
		w := message.NewMessage(m.UUID, m.Payload)
		w.SetContext(m.Context())
		if err := wq.Publish("saga", w); err != nil {
			return nil, err
		}
		if calls == 1 {
			return nil, errors.New("a later step failed") // after the insert was held
		}
		return nil, nil
	})
	for calls < 2 {
		m := receive(t, relayed, 5*time.Second)
		if _, err := h(m); err != nil {
			m.Nack()
			continue
		}
		m.Ack()
	}
	var n int
	eventually(t, 5*time.Second, "the message enqueued", func() bool {
		err := pool.QueryRow(t.Context(), `SELECT count(*) FROM work_queue`).Scan(&n)
		return err == nil && n > 0
	})
	expectNone(t, relayed, 300*time.Millisecond)
	if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM work_queue`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("%d rows (%v) for one message nacked once, want 1", n, err)
	}
}
