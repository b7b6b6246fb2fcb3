package postgres_test

import (
	"sync"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// poisonMessage is a message as Watermill's PoisonQueue middleware hands it
// to its publisher: the original UUID, payload and metadata plus the
// poison keys.
func poisonMessage(t *testing.T, uuid string) *message.Message {
	t.Helper()
	m := message.NewMessage(uuid, []byte(`{"deal_id": 42}`))
	m.Metadata.Set(outbox.MetadataType, outbox.TypeInvoiceRequest)
	m.Metadata.Set(outbox.MetadataSchemaVersion, "1")
	m.Metadata.Set(middleware.ReasonForPoisonedKey, "poison message: cannot decode invoice request")
	m.Metadata.Set(middleware.PoisonedTopicKey, outbox.InvoiceTopic)
	m.Metadata.Set(middleware.PoisonedHandlerKey, "invoice-saga")
	m.SetContext(t.Context())
	return m
}

// deadLetterCounts returns, for message uuid, the dead letters, their
// MessageDeadLettered events and the poison alerts raised with them.
func deadLetterCounts(t *testing.T, f *dlqFixture, uuid string) (letters, events, alerts int) {
	t.Helper()
	err := f.pool.QueryRow(t.Context(), `SELECT
		(SELECT count(*) FROM dead_letters WHERE message_uuid=$1),
		(SELECT count(*) FROM events WHERE type=$2 AND payload->>'message_uuid'=$1),
		(SELECT count(*) FROM alerts a JOIN dead_letters d ON d.id=a.dead_letter_id WHERE d.message_uuid=$1 AND a.kind=$3)`,
		uuid, domain.TypeMessageDeadLettered, domain.AlertKindPoison).Scan(&letters, &events, &alerts)
	if err != nil {
		t.Fatal(err)
	}
	return letters, events, alerts
}

// TestPoisonDeadLetteredOncePerMessage: the same poison message published
// twice (a redelivery after a crash between the dead letter's commit and
// the ack; or both the relay's and the queue's PoisonQueue) makes one dead
// letter, one MessageDeadLettered event and one alert; the second publish
// succeeds, so that the message is acknowledged.
func TestPoisonDeadLetteredOncePerMessage(t *testing.T) {
	t.Parallel()
	f := newDLQFixture(t, 4)
	uuid := watermill.NewUUID()
	relay, queue := postgres.NewDeadLetterPublisher(f.store), postgres.NewDeadLetterPublisher(f.store)
	if err := queue.Publish(postgres.DeadLetterTopic, poisonMessage(t, uuid)); err != nil {
		t.Fatalf("first publish: %v", err)
	}
	for i, p := range []*postgres.DeadLetterPublisher{queue, relay} {
		if err := p.Publish(postgres.DeadLetterTopic, poisonMessage(t, uuid)); err != nil {
			t.Fatalf("publish %d of the same message: %v", i+2, err)
		}
	}
	if l, e, a := deadLetterCounts(t, f, uuid); l != 1 || e != 1 || a != 1 {
		t.Fatalf("after 3 publishes of one message: %d dead letters, %d MessageDeadLettered events, %d alerts; want 1 each", l, e, a)
	}
	var claimed string
	if err := f.pool.QueryRow(t.Context(), `SELECT p.dead_letter_id::text FROM poison_dead_letters p
		JOIN dead_letters d ON d.id = p.dead_letter_id WHERE p.message_uuid=$1 AND d.message_uuid=$1`, uuid).Scan(&claimed); err != nil {
		t.Fatalf("the claim does not name the dead letter: %v", err)
	}

	// Another message is dead-lettered as usual.
	other := watermill.NewUUID()
	if err := relay.Publish(postgres.DeadLetterTopic, poisonMessage(t, other)); err != nil {
		t.Fatal(err)
	}
	if l, e, a := deadLetterCounts(t, f, other); l != 1 || e != 1 || a != 1 {
		t.Fatalf("another message: %d dead letters, %d events, %d alerts; want 1 each", l, e, a)
	}
}

// TestPoisonDeadLetteredOnceConcurrently: deliveries of one poison message
// dead-lettered at the same moment (the second claim waits for the first
// transaction) still make one dead letter.
func TestPoisonDeadLetteredOnceConcurrently(t *testing.T) {
	t.Parallel()
	const n = 4
	f := newDLQFixture(t, n+1)
	uuid := watermill.NewUUID()
	p := postgres.NewDeadLetterPublisher(f.store)
	start := make(chan struct{})
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		m := poisonMessage(t, uuid)
		wg.Go(func() {
			<-start
			errs[i] = p.Publish(postgres.DeadLetterTopic, m)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("publish %d: %v", i, err)
		}
	}
	if l, e, a := deadLetterCounts(t, f, uuid); l != 1 || e != 1 || a != 1 {
		t.Fatalf("%d concurrent publishes of one message: %d dead letters, %d events, %d alerts; want 1 each", n, l, e, a)
	}
}
