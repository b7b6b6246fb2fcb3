package outbox

import (
	"context"
	"errors"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
)

// NotifyChannel is the channel relays LISTEN on; writers notify it after
// committing outbox rows (Notifier).
const NotifyChannel = "dealbridge_outbox"

// rampSteps is how many quick retries (1ms … 64ms) follow rows or a wake-up.
const rampSteps = 7

// wakeBackoff is the relay subscriber's watermill-sql BackoffManager: where
// the library would sleep PollInterval after an empty query, it waits for a
// NOTIFY instead, with PollInterval as the fallback.
//
// An empty query right after a wake-up is not rare: a row is visible to the
// relay only once every older transaction has finished (the snapshot xmin
// rule that makes the relay gap-safe), and the transaction holding xmin back
// may write no outbox row, so nothing would notify when it ends. After
// rows or a wake-up, empty queries are therefore retried after 1, 2, 4 … 64
// ms before the relay settles to waiting for a NOTIFY or PollInterval.
//
// HandleError is called only by the subscriber's single consume loop, so the
// ramp needs no lock.
type wakeBackoff struct {
	wake    chan struct{}
	closing <-chan struct{}
	poll    time.Duration
	empty   int
	errors  wsql.BackoffManager // the library's handling of query errors
}

func newWakeBackoff(poll, retry time.Duration, closing <-chan struct{}) *wakeBackoff {
	return &wakeBackoff{
		wake:    make(chan struct{}, 1),
		closing: closing,
		poll:    poll,
		errors:  wsql.NewDefaultBackoffManager(poll, retry),
	}
}

// notify wakes the relay, or makes its next wait return at once.
func (b *wakeBackoff) notify() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *wakeBackoff) HandleError(logger watermill.LoggerAdapter, noMsg bool, err error) time.Duration {
	if err != nil {
		b.empty = 0
		if errors.Is(err, context.Canceled) {
			return 0 // shutting down: the subscriber's loop sees it next
		}
		return b.errors.HandleError(logger, noMsg, err)
	}
	if !noMsg {
		b.empty = 0
		return 0
	}
	d := b.poll
	if b.empty < rampSteps {
		d = min(b.poll, time.Millisecond<<b.empty)
	}
	b.empty++
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-b.wake:
		b.empty = 0
	case <-t.C:
	case <-b.closing:
	}
	return 0
}
