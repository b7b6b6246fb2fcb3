package outbox

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ConsumerGroup is the relay's watermill-sql consumer group. Every relay
// process uses the same group: the offsets row is locked FOR UPDATE while a
// batch is relayed, so several relays give failover, not double delivery.
const ConsumerGroup = "relay"

// RelayConfig configures a Relay. Zero values mean the defaults.
type RelayConfig struct {
	// PollInterval is how often an idle relay looks for new rows.
	// Default 100ms.
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
	fwd *forwarder.Forwarder
	sub *wsql.Subscriber
}

// NewRelay builds a relay reading the outbox through pool.
func NewRelay(pool *pgxpool.Pool, target message.Publisher, cfg RelayConfig, logger *slog.Logger) (*Relay, error) {
	wlog := watermill.NewSlogLogger(logger)
	sub, err := wsql.NewSubscriber(wsql.BeginnerFromPgx(pool), wsql.SubscriberConfig{
		ConsumerGroup:  ConsumerGroup,
		PollInterval:   cmp.Or(cfg.PollInterval, 100*time.Millisecond),
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
	return &Relay{fwd: fwd, sub: sub}, nil
}

// Run relays until ctx is done or Close is called.
func (r *Relay) Run(ctx context.Context) error {
	if err := r.fwd.Run(ctx); err != nil {
		return fmt.Errorf("relay stopped: %w", err)
	}
	return nil
}

// Running is closed once the relay is running.
func (r *Relay) Running() chan struct{} { return r.fwd.Running() }

// Close stops the relay, waiting for the batch in flight.
func (r *Relay) Close() error { return r.fwd.Close() }
