package saga_test

import (
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// TestRecordAcknowledgesInTheSameTransaction: a request delivered by the
// work queue is acknowledged by the transaction that records the invoice —
// its row is gone before the handler even returns — so a crash between that
// commit and the Ack cannot bring it back.
func TestRecordAcknowledgesInTheSameTransaction(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 6, erpsim.Config{})
	d, m := e.wonDeal(t)
	ctx := t.Context()

	pub, err := queue.NewPublisher(e.pool, queue.PublisherConfig{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Publish(outbox.InvoiceTopic, m); err != nil {
		t.Fatal(err)
	}
	sub, err := queue.NewSubscriber(e.pool, queue.SubscriberConfig{Consumers: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Close() })
	ch, err := sub.Subscribe(ctx, outbox.InvoiceTopic)
	if err != nil {
		t.Fatal(err)
	}
	var got *message.Message
	select {
	case got = <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery")
	}
	if err := e.handler.Handle(got); err != nil {
		t.Fatal(err)
	}
	// Not acked yet: the row must already be gone, with the invoice.
	var rows int
	if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM work_queue WHERE uuid = $1`, m.UUID).Scan(&rows); err != nil {
		t.Fatal(err)
	}
	deal, err := e.store.GetDeal(ctx, d.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rows != 0 || deal.Status != domain.StatusInvoiced {
		t.Errorf("before the Ack: %d work-queue row(s), deal %s; want 0 rows and invoiced", rows, deal.Status)
	}
	got.Ack()
}
