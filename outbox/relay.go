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
	// Retention, when positive, is how long relayed outbox rows are kept:
	// every PruneInterval the relay deletes the rows it has passed that
	// are older (PruneRelayed), in batches of 1,000. Zero keeps them all.
	Retention time.Duration
	// PruneInterval is how often the relay prunes. Default 1m.
	PruneInterval time.Duration
	// Beginner, when set, wraps the Beginner the relay's transactions
	// begin with (watermill-sql's on pool), e.g. queue.DeferringBeginner,
	// so that a batch's publishes into the work queue travel together.
	Beginner func(wsql.Beginner) wsql.Beginner
}

// Relay moves outbox messages to their destination topics on target.
//
// When target publishes into Postgres and honours the watermill-sql
// transaction in the message context (the work queue does), the publish and
// the relay's offset commit in one transaction: a crash at any instant either
// redelivers the batch or has delivered it, never half. Delivery is
// at-least-once in general; handlers deduplicate by idempotency key.
type Relay struct {
	pool   *pgxpool.Pool
	cfg    RelayConfig
	log    *slog.Logger
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
	begin := wsql.BeginnerFromPgx(pool)
	if cfg.Beginner != nil {
		begin = cfg.Beginner(begin)
	}
	sub, err := wsql.NewSubscriber(begin, wsql.SubscriberConfig{
		ConsumerGroup:  ConsumerGroup,
		PollInterval:   poll,
		BackoffManager: wake,
		ResendInterval: time.Second,
		RetryInterval:  time.Second,
		SchemaAdapter: relaySchema{wsql.DefaultPostgreSQLSchema{
			SubscribeBatchSize: cmp.Or(cfg.BatchSize, 100),
		}},
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
		pool: pool, cfg: cfg, log: logger.With("component", "relay"),
		fwd: fwd, sub: sub, wake: wake, closing: closing,
		listen: &pgnotify.Listener{
			Conn: pool.Config().ConnConfig, Channel: NotifyChannel,
			OnNotify:  func(string) { wake.notify() },
			OnConnect: wake.notify, // rows committed while nobody listened
			Logger:    logger.With("component", "relay"),
		},
	}, nil
}

// relaySchema is watermill-sql's DefaultPostgreSQLSchema whose select is
// the database function outbox_relay_batch (migrations/00015): the same
// rows (the cursor locked FOR UPDATE, the rows after it up to the
// snapshot's xmin, in order, at most a batch), read as one range of the
// primary key with a plan that stale statistics cannot turn into a
// sequential scan.
//
// The library's select, prepared once per connection, got a generic plan
// costed on the outbox's size when the plan was made: a relay that starts
// on an empty outbox (a new deployment, every database of the benchmark)
// kept a sequential scan of the outbox, which keeps every relayed row,
// until autovacuum analyzed it (1.9 ms a poll by the end of a 10 s bench
// phase, a tenth of a core). Planning it on every execution instead costs
// 0.35 ms a poll (BenchmarkRelay). TestRelayDoesNotScanTheOutboxWithAPlanFromWhenItWasEmpty
// checks the plan; the relay tests check the rows.
type relaySchema struct{ wsql.DefaultPostgreSQLSchema }

func (s relaySchema) SelectQuery(params wsql.SelectQueryParams) (wsql.Query, error) {
	if params.Topic != Topic {
		return wsql.Query{}, fmt.Errorf("the relay reads topic %q only, not %q", Topic, params.Topic)
	}
	if _, ok := params.OffsetsAdapter.(wsql.DefaultPostgreSQLOffsetsAdapter); !ok {
		return wsql.Query{}, fmt.Errorf("the relay's select needs watermill-sql's default offsets table, not %T", params.OffsetsAdapter)
	}
	return wsql.Query{
		Query: `SELECT "offset", transaction_id, uuid, payload, metadata FROM outbox_relay_batch($1, $2)`,
		Args:  []any{params.ConsumerGroup, cmp.Or(s.SubscribeBatchSize, 100)},
	}, nil
}

// Run relays until ctx is done or Close is called. A dedicated connection
// LISTENs for outbox commits, so a relay picks new rows up within
// milliseconds; polling every PollInterval is the fallback.
func (r *Relay) Run(ctx context.Context) error {
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { r.listen.Run(lctx) })
	if r.cfg.Retention > 0 {
		wg.Go(func() { r.prune(lctx) })
	}
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

// pruneBatch is how many rows one prune statement deletes at most: short
// statements, so that a large first prune does not hold locks or bloat one
// transaction.
const pruneBatch = 1000

// prune deletes relayed rows older than the retention every PruneInterval
// until ctx is done. Several relays may prune at once: a row deleted twice
// is deleted once.
func (r *Relay) prune(ctx context.Context) {
	tick := time.NewTicker(cmp.Or(r.cfg.PruneInterval, time.Minute))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var total int64
		for ctx.Err() == nil {
			n, err := PruneRelayed(ctx, r.pool, r.cfg.Retention, pruneBatch)
			if err != nil {
				if ctx.Err() == nil {
					r.log.WarnContext(ctx, "outbox prune failed; retrying at the next interval", "err", err)
				}
				break
			}
			total += n
			if n < pruneBatch {
				break
			}
		}
		if total > 0 {
			r.log.DebugContext(ctx, "outbox pruned", "rows", total, "retention", r.cfg.Retention)
		}
	}
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
