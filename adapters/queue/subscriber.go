package queue

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// SubscriberConfig configures a [Subscriber]. Zero fields take the defaults
// noted on each field.
type SubscriberConfig struct {
	// Consumers is the number of consumer goroutines per subscription,
	// which is the most messages one subscription has claimed at a time
	// (it claims for idle consumers only, several in one query when
	// several are idle). Default 4.
	Consumers int

	// Lease is how long a claim is valid without an extension (measured
	// on the database clock). The lease is extended every Lease/3 while
	// the message is out; a crashed consumer's message becomes claimable
	// again after at most Lease. It also bounds each queue query.
	// Default 30s.
	Lease time.Duration

	// NackDelay is how long a nacked message waits before its next
	// delivery when the message carries no [MetadataNackDelay].
	// Default 1s; negative means immediately.
	NackDelay time.Duration

	// PollInterval is how often an idle consumer looks for work when no
	// NOTIFY woke it (NOTIFY is a wake-up only, not durable). Default
	// 500ms.
	PollInterval time.Duration

	// CloseTimeout is how long Close (or the cancellation of a Subscribe
	// context) waits for handlers to Ack or Nack the messages they hold,
	// after cancelling their contexts. Messages still out after it are left
	// to lease expiry. Default 10s.
	CloseTimeout time.Duration

	// ReconnectDelay is the pause before the LISTEN connection is opened
	// again after it failed. Default 1s.
	ReconnectDelay time.Duration

	// HandlerTimeout bounds how long a handler may hold a message: past
	// it the message's context is cancelled with cause [ErrHandlerTimeout]
	// (the handler should then Nack). A handler that still holds it
	// CloseTimeout later loses it: the consumer stops extending the lease
	// and takes the next message, and the message returns at lease
	// expiry. Default 5m; negative means no limit.
	HandlerTimeout time.Duration
}

func (c SubscriberConfig) withDefaults() SubscriberConfig {
	c.Consumers = cmp.Or(c.Consumers, 4)
	c.Lease = cmp.Or(c.Lease, 30*time.Second)
	c.NackDelay = max(cmp.Or(c.NackDelay, time.Second), 0)
	c.PollInterval = cmp.Or(c.PollInterval, 500*time.Millisecond)
	c.CloseTimeout = cmp.Or(c.CloseTimeout, 10*time.Second)
	c.ReconnectDelay = cmp.Or(c.ReconnectDelay, time.Second)
	c.HandlerTimeout = cmp.Or(c.HandlerTimeout, 5*time.Minute)
	return c
}

func (c SubscriberConfig) validate() error {
	switch {
	case c.Consumers < 0:
		return errors.New("queue: negative Consumers")
	case c.Lease < 0, c.PollInterval < 0, c.CloseTimeout < 0, c.ReconnectDelay < 0:
		return errors.New("queue: negative duration in SubscriberConfig")
	case c.Lease > 0 && c.Lease < 30*time.Millisecond:
		return errors.New("queue: Lease below 30ms")
	}
	return nil
}

// Subscriber delivers messages from the work_queue table. Each
// subscription (one Subscribe call) runs Config.Consumers consumers, which
// compete with every other consumer of the topic, in this process or
// another: each message goes to exactly one consumer at a time.
//
// A delivered message's context is derived from the Subscribe context and
// is cancelled when the message is acked or nacked, when its lease is lost
// (cause [ErrLeaseLost]), and when the subscription stops.
type Subscriber struct {
	pool *pgxpool.Pool
	cfg  SubscriberConfig
	log  *slog.Logger

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // consumers, subscription closers and the listener

	mu        sync.Mutex
	closed    bool
	listening bool
	wakers    map[string]*waker // by topic
}

var (
	_ message.Subscriber           = (*Subscriber)(nil)
	_ message.SubscribeInitializer = (*Subscriber)(nil)
)

// NewSubscriber returns a Subscriber that claims work through pool and
// listens for wake-ups on a dedicated connection opened with pool's
// connection config. A nil logger means slog.Default().
func NewSubscriber(pool *pgxpool.Pool, cfg SubscriberConfig, logger *slog.Logger) (*Subscriber, error) {
	if pool == nil {
		return nil, errors.New("queue: nil pool")
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Subscriber{
		pool:   pool,
		cfg:    cfg.withDefaults(),
		log:    cmp.Or(logger, slog.Default()),
		ctx:    ctx,
		cancel: cancel,
		wakers: map[string]*waker{},
	}, nil
}

// SubscribeInitialize only validates topic: the table is created by the
// migrations, not at run time.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	if topic == "" {
		return errors.New("queue: empty topic")
	}
	return nil
}

// Subscribe starts Config.Consumers consumers on topic and returns the
// channel they deliver to. The channel is closed once ctx is cancelled or
// Close is called and every consumer has finished (see Close).
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if err := s.SubscribeInitialize(topic); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	w := s.wakers[topic]
	if w == nil {
		w = newWaker()
		s.wakers[topic] = w
	}
	if !s.listening {
		s.listening = true
		s.wg.Go(func() { s.listen(s.ctx) })
	}

	subCtx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.ctx, cancel)
	out := make(chan *message.Message)
	work := make(chan *claim, s.cfg.Consumers)
	slots := make(chan struct{}, s.cfg.Consumers)
	for range cap(slots) {
		slots <- struct{}{}
	}
	freed := make(chan struct{}, 1)
	var consumers sync.WaitGroup
	consumers.Go(func() { s.fetch(subCtx, topic, w, work, slots, freed) })
	for range s.cfg.Consumers {
		consumers.Go(func() { s.consume(subCtx, topic, work, slots, freed, out) })
	}
	s.wg.Go(func() {
		consumers.Wait()
		close(out)
		stop()
		cancel()
	})
	s.log.DebugContext(ctx, "queue: subscribed", "topic", topic, "consumers", s.cfg.Consumers)
	return out, nil
}

// Close stops every subscription: consumers stop claiming, messages claimed
// but not yet handed out are released at once (their attempt uncounted),
// and the contexts of messages held by handlers are cancelled. Close then
// waits up to Config.CloseTimeout for those handlers to Ack or Nack (and
// for the resulting queries); a message still held after that keeps its
// row leased and is delivered again once the lease expires. Close closes
// the LISTEN connection but not the pool, which belongs to the caller. It
// is safe to call more than once.
func (s *Subscriber) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return nil
}

// claim is one claimed row.
type claim struct {
	id         int64
	token      pgtype.UUID
	uuid       string
	payload    []byte
	metadata   map[string]string
	attempt    int
	enqueuedAt time.Time
	claimedAt  time.Time // Go clock, before the claim query: a lower bound
	fetchedAt  time.Time // Go clock, once the claim query returned it
	// ackedInTx is set by AckTx: the row was deleted in the handler's own
	// transaction, so an Ack has nothing left to do. (A Nack still applies:
	// the transaction may have rolled the delete back.)
	ackedInTx atomic.Bool
	// ackCommitted is set by AckTxCommitted: that transaction committed,
	// so the Ack skips its own (fenced, idempotent) delete.
	ackCommitted atomic.Bool
}

type claimKey struct{}

// claimSQL claims up to $3 of the oldest claimable rows of a topic in one
// statement (its own short transaction) through the function of migration
// 00012: only the head (lowest id) of each ordering key is claimable, so a
// batch never holds two messages of one key, and the lease is computed on
// the database clock. The function pins the plan (an ordered index walk
// that stops after $3 rows): planned from the statistics of an empty queue,
// the same UPDATE read and sorted the whole backlog on every claim.
const claimSQL = `SELECT id, claim_token, uuid, payload, metadata, attempts, created_at FROM work_queue_claim($1, $2, $3)`

const (
	ackSQL    = `DELETE FROM work_queue WHERE id = $1 AND claim_token = $2`
	extendSQL = `UPDATE work_queue SET lease_until = now() + $3 * interval '1 microsecond'
WHERE id = $1 AND claim_token = $2`
	nackSQL = `UPDATE work_queue
SET lease_until = NULL, claim_token = NULL,
    available_at = now() + $3 * interval '1 microsecond',
    last_error = CASE WHEN $4 = '' THEN last_error ELSE $4 END
WHERE id = $1 AND claim_token = $2`
	releaseSQL = `UPDATE work_queue
SET lease_until = NULL, claim_token = NULL, attempts = attempts - 1
WHERE id = $1 AND claim_token = $2`
)

// opCtx returns a context for one queue query that is not cancelled with
// the subscription (an ack or release must still run during Close) but is
// bounded by the lease: past it, the result no longer matters.
func (s *Subscriber) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), s.cfg.Lease)
}

// claim claims up to n messages of topic, oldest first.
func (s *Subscriber) claim(ctx context.Context, topic string, n int) ([]*claim, error) {
	ctx, cancel := s.opCtx(ctx)
	defer cancel()
	claimedAt := time.Now()
	rows, err := s.pool.Query(ctx, claimSQL, topic, s.cfg.Lease.Microseconds(), n)
	if err != nil {
		return nil, fmt.Errorf("queue: cannot claim from %q: %w", topic, err)
	}
	var claims []*claim
	for rows.Next() {
		c := &claim{claimedAt: claimedAt, fetchedAt: time.Now()}
		var md []byte
		if err := rows.Scan(&c.id, &c.token, &c.uuid, &c.payload, &md, &c.attempt, &c.enqueuedAt); err != nil {
			rows.Close()
			return nil, fmt.Errorf("queue: cannot read a claim from %q: %w", topic, err)
		}
		if err := json.Unmarshal(md, &c.metadata); err != nil {
			// Deliver anyway: losing metadata is better than a poison row
			// that blocks its ordering key forever.
			s.log.ErrorContext(ctx, "queue: undecodable metadata", "id", c.id, "err", err)
		}
		claims = append(claims, c)
	}
	if err := rows.Err(); err != nil {
		// The statement failed as a whole (nothing committed), or the
		// connection broke after it committed: rows already read are
		// delivered; any others come back when their lease expires.
		return claims, fmt.Errorf("queue: cannot claim from %q: %w", topic, err)
	}
	return claims, nil
}

// fetch claims messages for a subscription's consumers until ctx is done,
// then closes work. One fetcher per subscription claims for all its idle
// consumers in one query (slots holds one token per idle consumer): fewer
// and less contended claim queries than one claim per consumer, and never
// a message claimed without a consumer free to take it at once.
func (s *Subscriber) fetch(ctx context.Context, topic string, w *waker, work chan<- *claim, slots chan struct{}, freed <-chan struct{}) {
	defer close(work)
	for ctx.Err() == nil {
		// Take every free slot: claim for every idle consumer.
		n := 0
	take:
		for {
			select {
			case <-slots:
				n++
			default:
				break take
			}
		}
		if n == 0 { // every consumer is busy
			select {
			case <-freed:
			case <-ctx.Done():
			}
			continue
		}
		claims, err := s.claim(ctx, topic, n)
		if err != nil {
			s.log.WarnContext(ctx, "queue: claim failed", "topic", topic, "err", err)
		}
		if len(claims) > n {
			// Never expected (the claim locks at most n rows), but a
			// consumer must never be handed more than it has room for:
			// give the surplus back at once.
			s.log.ErrorContext(ctx, "queue: a claim returned more rows than asked; releasing the surplus", "asked", n, "got", len(claims))
			for _, c := range claims[n:] {
				s.apply(ctx, s.log, "release", releaseSQL, c.id, c.token)
			}
			claims = claims[:n]
		}
		for _, c := range claims {
			work <- c // never blocks: a slot was taken for it
		}
		for range n - len(claims) {
			slots <- struct{}{}
		}
		if len(claims) == n {
			w.wake() // there may be more: let another subscription of the topic look too
			continue
		}
		// The queue had less than asked: wait for a NOTIFY, a consumer
		// finishing (its ack may unblock the next message of its key) or
		// the poll.
		t := time.NewTimer(s.pollDelay())
		select {
		case <-w.wait():
		case <-freed:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
}

// consume is one consumer: it delivers claimed messages one at a time and
// waits for each one's Ack or Nack. After the fetcher stops it releases
// what is still buffered.
func (s *Subscriber) consume(ctx context.Context, topic string, work <-chan *claim, slots chan<- struct{}, freed chan<- struct{}, out chan<- *message.Message) {
	for c := range work {
		s.deliver(ctx, topic, c, out)
		slots <- struct{}{}
		select {
		case freed <- struct{}{}:
		default:
		}
	}
}

// pollDelay is PollInterval with ±10% jitter, so consumers do not poll in
// lock step.
func (s *Subscriber) pollDelay() time.Duration {
	p := s.cfg.PollInterval
	return p - p/10 + rand.N(p/5+1)
}

// deliver hands c to the subscription's channel, keeps its lease alive and
// applies the handler's Ack or Nack.
func (s *Subscriber) deliver(ctx context.Context, topic string, c *claim, out chan<- *message.Message) {
	log := s.log.With("topic", topic, "id", c.id, "uuid", c.uuid, "attempt", c.attempt)
	if ctx.Err() != nil || time.Since(c.fetchedAt) > s.cfg.Lease/2 {
		// Stopping, or it waited in the buffer for half its lease (the
		// consumers are stuck): give it back untouched, for any consumer.
		s.apply(ctx, log, "release", releaseSQL, c.id, c.token)
		return
	}
	msg := message.NewMessage(c.uuid, c.payload)
	for k, v := range c.metadata {
		msg.Metadata.Set(k, v)
	}
	delete(msg.Metadata, MetadataNackDelay)
	delete(msg.Metadata, MetadataNackReason)
	msg.Metadata.Set(MetadataAttempt, strconv.Itoa(c.attempt))
	msg.Metadata.Set(MetadataEnqueuedAt, c.enqueuedAt.UTC().Format(time.RFC3339Nano))
	msgCtx, cancelMsg := context.WithCancelCause(context.WithValue(ctx, claimKey{}, c))
	defer cancelMsg(nil)
	if s.cfg.HandlerTimeout > 0 {
		t := time.AfterFunc(s.cfg.HandlerTimeout, func() {
			log.ErrorContext(ctx, "queue: handler held the message too long; cancelling it", "timeout", s.cfg.HandlerTimeout)
			cancelMsg(ErrHandlerTimeout)
		})
		defer t.Stop()
	}
	msg.SetContext(msgCtx)

	hbCtx, stopHeartbeat := context.WithCancel(context.WithoutCancel(ctx))
	hbDone := make(chan struct{})
	go s.heartbeat(hbCtx, c, cancelMsg, log, hbDone)
	stopHB := func() {
		stopHeartbeat()
		<-hbDone
	}

	select {
	case out <- msg:
	case <-ctx.Done():
		// Nobody saw it: give it back untouched.
		stopHB()
		s.apply(ctx, log, "release", releaseSQL, c.id, c.token)
		return
	}

	var giveUp <-chan time.Time
	if s.cfg.HandlerTimeout > 0 {
		t := time.NewTimer(s.cfg.HandlerTimeout + s.cfg.CloseTimeout)
		defer t.Stop()
		giveUp = t.C
	}
	var acked bool
	select {
	case <-msg.Acked():
		acked = true
	case <-msg.Nacked():
	case <-giveUp:
		// The handler ignored its cancelled context for a grace period:
		// stop extending the lease and take the consumer back; the message
		// returns when the lease lapses.
		stopHB()
		log.ErrorContext(ctx, "queue: handler still holds the message after its timeout; left to lease expiry")
		return
	case <-ctx.Done():
		// msgCtx is cancelled with ctx; give the handler a grace period.
		t := time.NewTimer(s.cfg.CloseTimeout)
		defer t.Stop()
		select {
		case <-msg.Acked():
			acked = true
		case <-msg.Nacked():
		case <-t.C:
			stopHB()
			log.WarnContext(ctx, "queue: message not acked before close; left to lease expiry")
			return
		}
	}
	stopHB()
	if acked {
		if c.ackCommitted.Load() {
			return // deleted by the handler's committed transaction
		}
		// Also after AckTx whose commit nobody confirmed: its transaction
		// may have rolled back (a panic turned into an Ack by a
		// middleware). The delete is fenced by the claim token, and finds
		// nothing when AckTx committed.
		s.applyQuiet(ctx, log, "ack", c.ackedInTx.Load(), ackSQL, c.id, c.token)
		return
	}
	delay, ok, err := nackDelay(msg)
	if err != nil {
		log.WarnContext(ctx, "queue: ignoring nack delay", "err", err)
	}
	if !ok {
		delay = s.cfg.NackDelay
	}
	s.apply(ctx, log, "nack", nackSQL, c.id, c.token, delay.Microseconds(), msg.Metadata.Get(MetadataNackReason))
}

// apply runs a token-guarded statement on c's row. A row that no longer
// matches means the lease was lost (another consumer holds the message or
// it was already handled): that is logged, not an error.
func (s *Subscriber) apply(ctx context.Context, log *slog.Logger, op, query string, args ...any) {
	s.applyQuiet(ctx, log, op, false, query, args...)
}

// applyQuiet is apply that, when goneOK, expects the row may be gone
// already and says nothing then.
func (s *Subscriber) applyQuiet(ctx context.Context, log *slog.Logger, op string, goneOK bool, query string, args ...any) {
	opCtx, cancel := s.opCtx(ctx)
	defer cancel()
	tag, err := s.pool.Exec(opCtx, query, args...)
	switch {
	case err != nil:
		log.ErrorContext(ctx, "queue: "+op+" failed; the message will be redelivered after its lease", "err", err)
	case tag.RowsAffected() == 0 && !goneOK:
		log.WarnContext(ctx, "queue: "+op+" not applied: lease lost to another consumer")
	}
}

// heartbeat extends c's lease every Lease/3 until ctx is done. When the
// lease is gone (the token no longer matches, or no extension succeeded
// for a whole lease) it cancels the message context with ErrLeaseLost.
func (s *Subscriber) heartbeat(ctx context.Context, c *claim, cancelMsg context.CancelCauseFunc, log *slog.Logger, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(s.cfg.Lease / 3)
	defer t.Stop()
	last := c.claimedAt
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// Cancelled with the heartbeat (unlike other queue queries): once
		// the message is acked or nacked its lease no longer matters, and
		// an extension waiting on the row lock of the handler's own
		// AckTx must not hold up the ack.
		opCtx, cancel := context.WithTimeout(ctx, s.cfg.Lease)
		start := time.Now()
		tag, err := s.pool.Exec(opCtx, extendSQL, c.id, c.token, s.cfg.Lease.Microseconds())
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			log.WarnContext(ctx, "queue: lease extension failed", "err", err)
			if time.Since(last) >= s.cfg.Lease {
				log.ErrorContext(ctx, "queue: lease expired while the database was unreachable; cancelling the handler")
				cancelMsg(ErrLeaseLost)
				return
			}
		case tag.RowsAffected() == 0:
			log.WarnContext(ctx, "queue: lease lost to another consumer; cancelling the handler")
			cancelMsg(ErrLeaseLost)
			return
		default:
			last = start
		}
	}
}

// waker wakes the idle fetchers of one topic (one per subscription), one
// at a time: a wake-up is a single token that one idle fetcher takes. A
// fetcher that then claims a full batch passes the token on (there may be
// more work), so a burst wakes fetchers in a chain instead of a thundering
// herd of claim queries on every NOTIFY. A token left when nobody is idle
// is taken by the next fetcher to go idle, which costs one extra claim
// query and means no wake-up is lost while everybody is busy.
type waker struct{ ch chan struct{} }

func newWaker() *waker { return &waker{ch: make(chan struct{}, 1)} }

// wait returns the channel an idle consumer waits on.
func (w *waker) wait() <-chan struct{} { return w.ch }

// wake wakes one idle consumer (or the next one to go idle).
func (w *waker) wake() {
	select {
	case w.ch <- struct{}{}:
	default:
	}
}

// AckTx acknowledges msg inside tx, the handler's own transaction: its row
// is deleted there, so the message's effect and its acknowledgement commit
// or roll back together — no redelivery after a crash between them, and one
// commit instead of two. The handler must still return nil (Ack) when tx
// committed, or an error (Nack) when it did not: the subscriber then skips
// the separate delete, or applies the nack to the row the rollback kept.
//
// msg must have been delivered by a [Subscriber]. When its lease was lost
// (another consumer holds the message now), AckTx deletes nothing and
// returns nil: the handler's writes stand, and the other holder's delivery
// is a duplicate that idempotent handling absorbs.
func AckTx(ctx context.Context, tx pgx.Tx, msg *message.Message) error {
	c, ok := msg.Context().Value(claimKey{}).(*claim)
	if !ok {
		return errors.New("queue: AckTx: the message was not delivered by a queue Subscriber")
	}
	tag, err := tx.Exec(ctx, ackSQL, c.id, c.token)
	if err != nil {
		return fmt.Errorf("queue: cannot acknowledge message %s: %w", c.uuid, err)
	}
	if tag.RowsAffected() == 1 {
		c.ackedInTx.Store(true)
	}
	return nil
}

// QueueAckTx is AckTx queued in b, a batch the handler sends through its
// own transaction: the row's delete runs when b is sent, and the effect is
// the same as AckTx's (including for AckTxCommitted). A failed delete fails
// the batch.
func QueueAckTx(b *pgx.Batch, msg *message.Message) error {
	c, ok := msg.Context().Value(claimKey{}).(*claim)
	if !ok {
		return errors.New("queue: QueueAckTx: the message was not delivered by a queue Subscriber")
	}
	b.Queue(ackSQL, c.id, c.token).Exec(func(tag pgconn.CommandTag) error {
		if tag.RowsAffected() == 1 {
			c.ackedInTx.Store(true)
		}
		return nil
	})
	return nil
}

// AckTxCommitted tells the subscriber that the transaction in which AckTx
// deleted msg's row has committed, so the Ack that follows has nothing to
// do and skips its delete (one statement fewer per message). Call it only
// after a successful commit; without it the Ack deletes again, which is
// harmless. It does nothing when AckTx deleted no row (the lease was lost)
// or msg was not delivered by a [Subscriber].
func AckTxCommitted(msg *message.Message) {
	if c, ok := msg.Context().Value(claimKey{}).(*claim); ok && c.ackedInTx.Load() {
		c.ackCommitted.Store(true)
	}
}

// Delivered reports whether msg was delivered by a [Subscriber] (and so can
// be acknowledged with AckTx).
func Delivered(msg *message.Message) bool {
	_, ok := msg.Context().Value(claimKey{}).(*claim)
	return ok
}
