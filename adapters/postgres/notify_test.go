package postgres_test

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// countingTarget is a message.Publisher that counts what the relay hands it.
type countingTarget struct {
	mu sync.Mutex
	n  int
}

func (c *countingTarget) Publish(_ string, msgs ...*message.Message) error {
	c.mu.Lock()
	c.n += len(msgs)
	c.mu.Unlock()
	return nil
}

func (c *countingTarget) Close() error { return nil }

func (c *countingTarget) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// TestStoreWakesTheRelayAfterCommit: a unit of work that writes the outbox
// (a won close) wakes an idle relay whose poll interval is an hour, so the
// message is relayed at once; one that does not (a deal created) sends no
// wake-up the relay would act on.
func TestStoreWakesTheRelayAfterCommit(t *testing.T) {
	ctx := t.Context()
	pool := newPool(t, 8)
	s := postgres.NewStore(pool)
	setStock(t, s, "SKU-N", 10)
	d := createDeal(t, s, lines("SKU-N", 1))

	target := &countingTarget{}
	relay, err := outbox.NewRelay(pool, target, outbox.RelayConfig{PollInterval: time.Hour}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- relay.Run(context.Background()) }()
	t.Cleanup(func() {
		if err := relay.Close(); err != nil {
			t.Error(err)
		}
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	<-relay.Running()
	time.Sleep(300 * time.Millisecond) // past the relay's quick retries: now it waits for a NOTIFY

	start := time.Now()
	if _, err := s.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, domain.Metadata{Actor: "test"}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for target.count() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the close's outbox message was not relayed within 20s: no wake-up after the commit")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("relayed %v after the close returned", time.Since(start).Round(time.Millisecond))
	if n := target.count(); n != 1 {
		t.Errorf("%d messages relayed, want 1", n)
	}
}
