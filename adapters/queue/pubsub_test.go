package queue_test

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
	"github.com/dealbridge/dealbridge/adapters/queue"
)

// TestPubSub runs Watermill's universal Pub/Sub suite.
//
// Claimed: Persistent (messages live in a table and outlive every publisher
// and subscriber). Not claimed: GuaranteedOrder and
// GuaranteedOrderWithSingleSubscriber (even one subscriber runs several
// consumers, so unkeyed messages complete in any order; ordering exists only
// per ordering key, tested in TestOrderingKey), ExactlyOnceDelivery
// (at-least-once), ConsumerGroups and NewSubscriberReceivesOldMessages (a
// queue: each message goes to one consumer and is deleted on Ack),
// ContextPreserved (contexts do not cross the database), RestartServiceCommand
// (restarts are covered by the chaos tests, not here).
func TestPubSub(t *testing.T) {
	dbURL := newDatabase(t)
	var n atomic.Int64
	constructor := func(t *testing.T) (message.Publisher, message.Subscriber) {
		// Each pub/sub pair gets its own small pool: the suite creates
		// dozens at once (50 subscribers in TestConcurrentSubscribe).
		pool := newPool(t, dbURL, fmt.Sprintf("wq-suite-%d", n.Add(1)), 3)
		pub := newPublisher(t, pool)
		sub := newSubscriber(t, pool, queue.SubscriberConfig{
			Lease:        5 * time.Second,
			CloseTimeout: time.Second,
			NackDelay:    100 * time.Millisecond,
		})
		return pub, sub
	}
	tests.TestPubSub(t, tests.Features{Persistent: true}, constructor,
		func(t *testing.T, _ string) (message.Publisher, message.Subscriber) {
			t.Fatal("consumer groups are not supported")
			return nil, nil
		})
}
