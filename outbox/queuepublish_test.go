package outbox_test

import (
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/outbox"
)

// capturing records what the relay hands on: topic, payload, metadata.
type capturing struct {
	ch chan capture
}

type capture struct {
	topic string
	msg   *message.Message
}

func (c *capturing) Publish(topic string, msgs ...*message.Message) error {
	for _, m := range msgs {
		c.ch <- capture{topic, m}
	}
	return nil
}

func (c *capturing) Close() error { return nil }

// TestQueuePublishTxWritesWhatPublishTxWrites: a message queued in a batch
// with QueuePublishTx lands in the outbox row for row as PublishTx writes
// it (same envelope, same columns), only when the batch is sent and the
// transaction commits, and the relay delivers it to its destination topic
// with its UUID, payload and metadata.
func TestQueuePublishTxWritesWhatPublishTxWrites(t *testing.T) {
	ctx := t.Context()
	pool := newPool(t, 4)
	mk := func(payload string) *message.Message {
		m := message.NewMessage(watermill.NewUUID(), []byte(payload))
		m.Metadata.Set("k", "v")
		return m
	}
	direct, queued, rolledBack := mk(`{"via":"PublishTx"}`), mk(`{"via":"QueuePublishTx"}`), mk(`{"via":"rolled back"}`)

	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.PublishTx(ctx, tx, "dest", direct); err != nil {
		t.Fatal(err)
	}
	var b pgx.Batch
	if err := outbox.QueuePublishTx(&b, tx, "dest", queued); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM watermill_outbox`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("before the batch is sent the outbox holds %d rows (%v), want 1", n, err)
	}
	if err := tx.SendBatch(ctx, &b).Close(); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	tx, err = pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b = pgx.Batch{}
	if err := outbox.QueuePublishTx(&b, tx, "dest", rolledBack); err != nil {
		t.Fatal(err)
	}
	if err := tx.SendBatch(ctx, &b).Close(); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	// Same shape of row: the envelope of each names its destination and
	// carries the message; only the UUID and payload differ.
	rows, err := pool.Query(ctx, `SELECT payload::jsonb - 'uuid' - 'payload', metadata::text FROM watermill_outbox ORDER BY "offset"`)
	if err != nil {
		t.Fatal(err)
	}
	type row struct{ env, md string }
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		return x, r.Scan(&x.env, &x.md)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != got[1] {
		t.Fatalf("outbox rows %+v: want two rows of the same shape (the rolled-back one gone)", got)
	}

	rec := &capturing{ch: make(chan capture, 4)}
	startRelay(t, pool, rec, outbox.RelayConfig{})
	for _, want := range []*message.Message{direct, queued} {
		select {
		case c := <-rec.ch:
			if c.topic != "dest" || c.msg.UUID != want.UUID || string(c.msg.Payload) != string(want.Payload) || c.msg.Metadata.Get("k") != "v" {
				t.Errorf("relayed %s %s %s %v, want dest %s %s k=v", c.topic, c.msg.UUID, c.msg.Payload, c.msg.Metadata, want.UUID, want.Payload)
			}
		case <-time.After(waitDeadline):
			t.Fatalf("message %s not relayed", want.Payload)
		}
	}
	select {
	case c := <-rec.ch:
		t.Errorf("relayed %s, which was rolled back", c.msg.Payload)
	case <-time.After(200 * time.Millisecond):
	}
}
