package outbox

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/pgnotify"
)

// ConsumerGroup is the relay's watermill-sql consumer group. Every relay
// process uses the same group: the offsets row is locked FOR UPDATE while a
// batch is relayed, so several relays give failover, not double delivery.
const ConsumerGroup = "relay"

// RelayConfig configures a Relay. Zero values mean the defaults.
type RelayConfig struct {
	// PollInterval is how often an idle relay looks for new rows when no
	// NOTIFY woke it (NOTIFY is a wake-up only). Default 500ms.
	PollInterval time.Duration
	// BatchSize is how many rows one relay transaction moves. Default 100.
	BatchSize int
	// Middlewares wrap the forwarding handler (e.g. a poison queue).
	Middlewares []message.HandlerMiddleware
}

// Relay moves outbox messages to their destination topics on target.
//
// When target publishes into Postgres and honours the watermill-sql
// transaction in the message context (the work queue does), the publish and
// the relay's offset commit in one transaction: a crash at any instant either
// redelivers the batch or has delivered it, never half. Delivery is
// at-least-once in general; handlers deduplicate by idempotency key.
type Relay struct {
	fwd    *forwarder.Forwarder
	sub    *wsql.Subscriber
	wake   *wakeBackoff
	listen *pgnotify.Listener

	closeOnce sync.Once
	closing   chan struct{}
}

// NewRelay builds a relay reading the outbox through pool.
func NewRelay(pool *pgxpool.Pool, target message.Publisher, cfg RelayConfig, logger *slog.Logger) (*Relay, error) {
	wlog := watermill.NewSlogLogger(logger)
	poll := cmp.Or(cfg.PollInterval, 500*time.Millisecond)
	closing := make(chan struct{})
	wake := newWakeBackoff(poll, time.Second, closing)
	sub, err := wsql.NewSubscriber(wsql.BeginnerFromPgx(pool), wsql.SubscriberConfig{
		ConsumerGroup:  ConsumerGroup,
		PollInterval:   poll,
		BackoffManager: wake,
		ResendInterval: time.Second,
		RetryInterval:  time.Second,
		SchemaAdapter: wsql.DefaultPostgreSQLSchema{
			SubscribeBatchSize: cmp.Or(cfg.BatchSize, 100),
		},
		OffsetsAdapter: wsql.DefaultPostgreSQLOffsetsAdapter{},
		// The tables come from migrations; see package migrations.
		InitializeSchema: false,
	}, wlog)
	if err != nil {
		return nil, fmt.Errorf("cannot create outbox subscriber: %w", err)
	}
	fwd, err := forwarder.NewForwarder(sub, target, wlog, forwarder.Config{
		ForwarderTopic: Topic,
		Middlewares:    cfg.Middlewares,
		// Never ack what cannot be unwrapped: a poison envelope must be
		// dead-lettered by a middleware, not silently dropped.
		AckWhenCannotUnwrap: false,
	})
	if err != nil {
		return nil, fmt.Errorf("cannot create outbox forwarder: %w", err)
	}
	return &Relay{
		fwd: fwd, sub: sub, wake: wake, closing: closing,
		listen: &pgnotify.Listener{
			Conn: pool.Config().ConnConfig, Channel: NotifyChannel,
			OnNotify:  func(string) { wake.notify() },
			OnConnect: wake.notify, // rows committed while nobody listened
			Logger:    logger.With("component", "relay"),
		},
	}, nil
}

// Run relays until ctx is done or Close is called. A dedicated connection
// LISTENs for outbox commits, so a relay picks new rows up within
// milliseconds; polling every PollInterval is the fallback.
func (r *Relay) Run(ctx context.Context) error {
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { r.listen.Run(lctx) })
	stop := context.AfterFunc(ctx, r.stopWaiting)
	defer func() {
		stop()
		cancel()
		wg.Wait()
	}()
	if err := r.fwd.Run(ctx); err != nil {
		if ctx.Err() != nil && errors.Is(err, context.Canceled) {
			return nil // stopped while starting: a clean shutdown too
		}
		return fmt.Errorf("relay stopped: %w", err)
	}
	return nil
}

// stopWaiting ends an idle wait at once, so shutdown does not wait for the
// poll interval.
func (r *Relay) stopWaiting() { r.closeOnce.Do(func() { close(r.closing) }) }

// Running is closed once the relay is running.
func (r *Relay) Running() chan struct{} { return r.fwd.Running() }

// Close stops the relay, waiting for the batch in flight.
func (r *Relay) Close() error {
	r.stopWaiting()
	return r.fwd.Close()
}
