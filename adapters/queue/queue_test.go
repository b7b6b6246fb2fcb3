package queue_test

import (
	"context"
	"errors"
	"fmt"
	"github.com/jackc/pgx/v5/pgtype"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A consumer that dies holding a message (its pool closed under it, so it
// can neither ack nor extend the lease) loses the message to another
// consumer once the lease expires; the attempt count says 2.
func TestCrashedConsumerLeaseExpires(t *testing.T) {
	dbURL := newDatabase(t)
	poolA := newPool(t, dbURL, "wq-crash-a", 4)
	poolB := newPool(t, dbURL, "wq-crash-b", 4)
	const lease = time.Second
	subA := newSubscriber(t, poolA, queue.SubscriberConfig{Lease: lease, CloseTimeout: 10 * time.Millisecond})
	subB := newSubscriber(t, poolB, queue.SubscriberConfig{Lease: lease, PollInterval: 50 * time.Millisecond})
	topic := "crash"
	sent := newMsg("work")
	publish(t, newPublisher(t, poolB), topic, sent)

	chA, err := subA.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	mA := receive(t, chA, 5*time.Second)
	if got := queue.Attempt(mA); got != 1 {
		t.Fatalf("first delivery: attempt %d, want 1", got)
	}
	if _, ok := queue.EnqueuedAt(mA); !ok {
		t.Errorf("no %s on the delivered message", queue.MetadataEnqueuedAt)
	}
	crashed := time.Now()
	poolA.Close() // the consumer's process "dies": no ack, no heartbeat

	chB, err := subB.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	mB := receive(t, chB, lease+3*time.Second)
	if mB.UUID != sent.UUID {
		t.Fatalf("got %s, want %s", mB.UUID, sent.UUID)
	}
	if got := queue.Attempt(mB); got != 2 {
		t.Errorf("redelivery: attempt %d, want 2", got)
	}
	if since := time.Since(crashed); since > lease+2*time.Second {
		t.Errorf("redelivered %s after the crash, lease is %s", since, lease)
	}
	// The dead consumer's handler was told: its heartbeat could not
	// extend the lease for a whole lease.
	select {
	case <-mA.Context().Done():
		if !errors.Is(context.Cause(mA.Context()), queue.ErrLeaseLost) {
			t.Errorf("old holder's context cause = %v, want ErrLeaseLost", context.Cause(mA.Context()))
		}
	case <-time.After(2 * lease):
		t.Error("old holder's context not cancelled after its lease ran out")
	}
	r, ok := readRow(t, poolB, sent.UUID)
	if !ok || r.attempts != 2 || !r.leased || r.lastError != "lease expired" {
		t.Errorf("row = %+v (exists %v), want attempts 2, leased, last_error 'lease expired'", r, ok)
	}
	mB.Ack()
	eventually(t, 5*time.Second, "row deleted by the new holder's ack", func() bool {
		_, ok := readRow(t, poolB, sent.UUID)
		return !ok
	})
}

// Fencing: once another consumer has claimed the message, the old holder's
// late Ack (and Nack) does nothing to the row.
func TestLateAckOfOldHolderIsFenced(t *testing.T) {
	dbURL := newDatabase(t)
	poolA := newPool(t, dbURL, "wq-fence-a", 4)
	poolB := newPool(t, dbURL, "wq-fence-b", 4)
	// A long lease: A's heartbeat (every 10s) does not run during the test.
	// A has one consumer, so that A itself cannot take the message over.
	subA := newSubscriber(t, poolA, queue.SubscriberConfig{Consumers: 1, Lease: 30 * time.Second})
	subB := newSubscriber(t, poolB, queue.SubscriberConfig{Lease: 30 * time.Second, PollInterval: 20 * time.Millisecond})
	topic := "fence"
	sent := newMsg("work")
	publish(t, newPublisher(t, poolA), topic, sent)

	chA, err := subA.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	mA := receive(t, chA, 5*time.Second)
	held, _ := readRow(t, poolA, sent.UUID)

	// A stalls past its lease (simulated on the database clock).
	if _, err := poolA.Exec(t.Context(), `UPDATE work_queue SET lease_until = now() - interval '1 ms' WHERE uuid = $1`, sent.UUID); err != nil {
		t.Fatal(err)
	}
	chB, err := subB.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	mB := receive(t, chB, 5*time.Second)
	if queue.Attempt(mB) != 2 {
		t.Fatalf("takeover: attempt %d, want 2", queue.Attempt(mB))
	}
	taken, _ := readRow(t, poolA, sent.UUID)
	if taken.token == held.token || taken.token == "" {
		t.Fatalf("takeover kept the claim token %q", taken.token)
	}

	mA.Ack() // late: must not delete B's message
	<-mA.Context().Done()
	// The ack query has run (the context is cancelled after it).
	r, ok := readRow(t, poolA, sent.UUID)
	if !ok {
		t.Fatal("the old holder's late Ack deleted the message held by the new consumer")
	}
	if r.token != taken.token || r.attempts != 2 || !r.leased {
		t.Fatalf("row after the late ack = %+v, want B's token %s, attempts 2, leased", r, taken.token)
	}

	mB.Ack()
	eventually(t, 5*time.Second, "row deleted by the holder's ack", func() bool {
		_, ok := readRow(t, poolA, sent.UUID)
		return !ok
	})
}

// The heartbeat keeps a long handler's lease alive, and cancels the
// handler's context once the lease is found taken.
func TestHeartbeatExtendsLeaseAndCancelsOnLoss(t *testing.T) {
	pool := newPool(t, newDatabase(t), "wq-heartbeat", 4)
	const lease = time.Second // generous: the heartbeat runs every lease/3 even on a loaded machine
	sub := newSubscriber(t, pool, queue.SubscriberConfig{Lease: lease})
	topic := "heartbeat"
	sent := newMsg("work")
	publish(t, newPublisher(t, pool), topic, sent)
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	m := receive(t, ch, 5*time.Second)

	time.Sleep(4 * lease) // a "long" handler
	if r, _ := readRow(t, pool, sent.UUID); !r.leased || r.attempts != 1 {
		t.Fatalf("after %s the row is %+v: the lease was not extended", 4*lease, r)
	}
	if m.Context().Err() != nil {
		t.Fatalf("handler context cancelled while the lease was held: %v", context.Cause(m.Context()))
	}

	// Another consumer takes the message over (new token).
	if _, err := pool.Exec(t.Context(), `UPDATE work_queue SET claim_token = gen_random_uuid() WHERE uuid = $1`, sent.UUID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Context().Done():
		if !errors.Is(context.Cause(m.Context()), queue.ErrLeaseLost) {
			t.Errorf("cause = %v, want ErrLeaseLost", context.Cause(m.Context()))
		}
	case <-time.After(3 * lease):
		t.Fatal("handler context not cancelled after the lease was lost")
	}
	m.Nack() // fenced: must not release the other holder's lease
	time.Sleep(100 * time.Millisecond)
	if r, ok := readRow(t, pool, sent.UUID); !ok || !r.leased {
		t.Fatalf("the fenced nack changed the row: %+v (exists %v)", r, ok)
	}
}

// I5: while a handler holds a message, none of the queue's sessions has a
// transaction open.
func TestNoTransactionWhileHandlerRuns(t *testing.T) {
	dbURL := newDatabase(t)
	const app = "wq-i5"
	pool := newPool(t, dbURL, app, 4)
	observer := newPool(t, dbURL, "wq-i5-observer", 2)
	pub := newPublisher(t, pool)

	// check counts the queue's sessions and those matching cond.
	check := func(cond string) (sessions int, bad string) {
		t.Helper()
		err := observer.QueryRow(t.Context(), `
SELECT count(*), COALESCE(string_agg(format('pid %s state %s xact_start %s xid %s query %s',
           pid, state, xact_start, backend_xid, query), '; ') FILTER (WHERE `+cond+`), '')
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = $1`, app).
			Scan(&sessions, &bad)
		if err != nil {
			t.Fatal(err)
		}
		return sessions, bad
	}
	const inTx = `xact_start IS NOT NULL OR backend_xid IS NOT NULL`
	// hold receives n messages and samples check(cond) for d while a
	// handler holds them, then acks them.
	hold := func(sub *queue.Subscriber, topic string, n int, d time.Duration, cond string) {
		t.Helper()
		for i := range n {
			publish(t, pub, topic, newMsg(strconv.Itoa(i)))
		}
		ch, err := sub.Subscribe(t.Context(), topic)
		if err != nil {
			t.Fatal(err)
		}
		var held []*message.Message
		for range n {
			m := receive(t, ch, 5*time.Second)
			if r, _ := readRow(t, observer, m.UUID); !r.leased {
				t.Fatalf("held message %s is not leased: %+v", m.UUID, r)
			}
			held = append(held, m)
		}
		samples := 0
		for deadline := time.Now().Add(d); time.Now().Before(deadline); samples++ {
			sessions, bad := check(cond)
			if sessions == 0 {
				t.Fatal("no queue sessions found: the check would be vacuous")
			}
			if bad != "" {
				t.Fatalf("queue session(s) in a transaction while handlers hold messages: %s", bad)
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("%s: %d samples, none matched", topic, samples)
		for _, m := range held {
			m.Ack()
		}
	}

	// Positive control: the check sees a transaction on such a session.
	tx, err := pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(t.Context(), `SELECT pg_current_xact_id()`); err != nil {
		t.Fatal(err)
	}
	if _, bad := check(inTx); bad == "" {
		t.Fatal("control: the open transaction was not seen")
	}
	if err := tx.Rollback(t.Context()); err != nil {
		t.Fatal(err)
	}

	// Strict: every consumer holds a message and no heartbeat is due, so
	// no queue session may have any transaction at all.
	strict := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 2, Lease: 30 * time.Second})
	hold(strict, "i5-strict", 2, 1500*time.Millisecond, inTx)
	if err := strict.Close(); err != nil {
		t.Fatal(err)
	}

	// Busy: idle consumers poll every 20ms and heartbeats run every 200ms.
	// Each is a single-statement transaction, so one may be seen running,
	// but none may sit idle in a transaction or last long.
	busy := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 4, Lease: 600 * time.Millisecond, PollInterval: 20 * time.Millisecond})
	hold(busy, "i5-busy", 2, 1500*time.Millisecond,
		`(`+inTx+`) AND (state <> 'active' OR xact_start < now() - interval '200 ms')`)
}

// One ordering key: strictly one message at a time, in publish order, even
// across nacks and with many consumers; different keys run in parallel.
func TestOrderingKey(t *testing.T) {
	dbURL := newDatabase(t)
	topic := "ordered"
	const keys, perKey = 6, 15
	pubPool := newPool(t, dbURL, "wq-order-pub", 2)
	var msgs []*message.Message
	for i := range perKey {
		for k := range keys {
			m := newMsg(strconv.Itoa(i))
			queue.SetOrderingKey(m, fmt.Sprintf("deal-%d", k))
			msgs = append(msgs, m)
		}
	}
	publish(t, newPublisher(t, pubPool), topic, msgs...)

	var (
		mu          sync.Mutex
		inFlight    = map[string]int{}
		done        = map[string][]int{}
		violations  []string
		concurrent  int
		maxParallel int
		acked       atomic.Int64
	)
	handle := func(m *message.Message) {
		key := m.Metadata.Get(queue.MetadataOrderingKey)
		seq, _ := strconv.Atoi(string(m.Payload))
		mu.Lock()
		inFlight[key]++
		if inFlight[key] > 1 {
			violations = append(violations, fmt.Sprintf("%s: %d in flight at seq %d", key, inFlight[key], seq))
		}
		concurrent++
		maxParallel = max(maxParallel, concurrent)
		mu.Unlock()

		time.Sleep(time.Duration(rand.IntN(4)+1) * time.Millisecond)
		nack := seq%5 == 2 && queue.Attempt(m) == 1

		mu.Lock()
		inFlight[key]--
		concurrent--
		if !nack {
			done[key] = append(done[key], seq)
		}
		mu.Unlock()
		if nack {
			queue.SetNackDelay(m, 20*time.Millisecond)
			m.Nack()
			return
		}
		acked.Add(1)
		m.Ack()
	}
	// Two subscribers (two "processes") with 8 consumers each.
	for i := range 2 {
		pool := newPool(t, dbURL, fmt.Sprintf("wq-order-%d", i), 10)
		sub := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 8, PollInterval: 50 * time.Millisecond})
		ch, err := sub.Subscribe(t.Context(), topic)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for m := range ch {
				go handle(m)
			}
		}()
	}
	eventually(t, 30*time.Second, "every message acked", func() bool { return acked.Load() == keys*perKey })

	mu.Lock()
	defer mu.Unlock()
	if len(violations) > 0 {
		t.Errorf("more than one message in flight per key: %v", violations)
	}
	want := make([]int, perKey)
	for i := range want {
		want[i] = i
	}
	for k := range keys {
		key := fmt.Sprintf("deal-%d", k)
		if !slices.Equal(done[key], want) {
			t.Errorf("%s handled in order %v, want %v", key, done[key], want)
		}
	}
	if maxParallel < 2 {
		t.Errorf("at most %d message(s) in flight: different keys did not run in parallel", maxParallel)
	}
	t.Logf("up to %d messages of different keys in flight", maxParallel)
}

// A handler sets a nack delay and returns an error (through a Watermill
// router): the message is not redelivered before the delay, and the
// attempt count survives a restart of the subscriber.
func TestNackDelaySurvivesRestart(t *testing.T) {
	dbURL := newDatabase(t)
	topic := "nack-delay"
	const delay = 1500 * time.Millisecond
	pool1 := newPool(t, dbURL, "wq-nack-1", 4)
	sent := newMsg("work")
	publish(t, newPublisher(t, pool1), topic, sent)

	sub1 := newSubscriber(t, pool1, queue.SubscriberConfig{})
	router, err := message.NewRouter(message.RouterConfig{CloseTimeout: 5 * time.Second}, watermill.NewSlogLogger(testLogger()))
	if err != nil {
		t.Fatal(err)
	}
	attempts := make(chan int, 10)
	var nackedBefore time.Time
	router.AddConsumerHandler("erp", topic, sub1, func(m *message.Message) error {
		nackedBefore = time.Now()
		attempts <- queue.Attempt(m)
		queue.SetNackDelay(m, delay)
		queue.SetNackReason(m, "erp: 503")
		return errors.New("erp: 503")
	})
	go func() {
		if err := router.Run(context.Background()); err != nil {
			t.Error(err)
		}
	}()
	select {
	case a := <-attempts:
		if a != 1 {
			t.Fatalf("first delivery: attempt %d, want 1", a)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no delivery")
	}
	if err := router.Close(); err != nil { // closes sub1, which waits for the nack
		t.Fatal(err)
	}
	if len(attempts) != 0 {
		t.Fatalf("redelivered before the delay (attempt %d)", <-attempts)
	}
	r, ok := readRow(t, pool1, sent.UUID)
	if !ok || r.attempts != 1 || r.leased || r.lastError != "erp: 503" || r.delayed < delay/2 {
		t.Fatalf("row after nack = %+v (exists %v), want attempts 1, not leased, last_error set, delayed ~%s", r, ok, delay)
	}

	// A new subscriber in a "new process".
	pool2 := newPool(t, dbURL, "wq-nack-2", 4)
	sub2 := newSubscriber(t, pool2, queue.SubscriberConfig{PollInterval: 20 * time.Millisecond})
	ch, err := sub2.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	m := receive(t, ch, delay+5*time.Second)
	if since := time.Since(nackedBefore); since < delay {
		t.Errorf("redelivered %s after the nack, delay is %s", since, delay)
	}
	if got := queue.Attempt(m); got != 2 {
		t.Errorf("after restart: attempt %d, want 2", got)
	}
	if m.Metadata.Get(queue.MetadataNackDelay) != "" {
		t.Errorf("the nack delay of the previous delivery leaked into this one")
	}
	m.Ack()
}

// listenerPID returns the backend pid of the subscriber's LISTEN connection
// (its last statement is the LISTEN), or 0.
func listenerPID(t *testing.T, observer *pgxpool.Pool, app string) int {
	t.Helper()
	var pid int
	err := observer.QueryRow(t.Context(), `
SELECT COALESCE(max(pid), 0) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND query LIKE 'LISTEN %'`, app).Scan(&pid)
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func TestNotifyWakeUp(t *testing.T) {
	dbURL := newDatabase(t)
	observer := newPool(t, dbURL, "wq-notify-observer", 2)
	pub := newPublisher(t, observer)

	t.Run("listener wakes consumers and reconnects", func(t *testing.T) {
		const app = "wq-notify-listen"
		pool := newPool(t, dbURL, app, 4)
		sub := newSubscriber(t, pool, queue.SubscriberConfig{PollInterval: time.Minute, ReconnectDelay: 100 * time.Millisecond})
		topic := "notify-listen"
		ch, err := sub.Subscribe(t.Context(), topic)
		if err != nil {
			t.Fatal(err)
		}
		var pid int
		eventually(t, 5*time.Second, "LISTEN connection", func() bool { pid = listenerPID(t, observer, app); return pid != 0 })
		time.Sleep(200 * time.Millisecond) // consumers have made their first (empty) claim and sleep for a minute

		start := time.Now()
		publish(t, pub, topic, newMsg("1"))
		receive(t, ch, time.Second).Ack()
		t.Logf("delivered %s after publish", time.Since(start))

		var killed bool
		if err := observer.QueryRow(t.Context(), `SELECT pg_terminate_backend($1)`, pid).Scan(&killed); err != nil || !killed {
			t.Fatalf("terminate listener: %v %v", killed, err)
		}
		eventually(t, 5*time.Second, "a new LISTEN connection", func() bool {
			p := listenerPID(t, observer, app)
			return p != 0 && p != pid
		})
		time.Sleep(100 * time.Millisecond)
		start = time.Now()
		publish(t, pub, topic, newMsg("2"))
		receive(t, ch, time.Second).Ack()
		t.Logf("after reconnect: delivered %s after publish", time.Since(start))
	})

	t.Run("polling covers a dead listener", func(t *testing.T) {
		const app = "wq-notify-poll"
		pool := newPool(t, dbURL, app, 4)
		sub := newSubscriber(t, pool, queue.SubscriberConfig{PollInterval: 200 * time.Millisecond, ReconnectDelay: time.Hour})
		topic := "notify-poll"
		ch, err := sub.Subscribe(t.Context(), topic)
		if err != nil {
			t.Fatal(err)
		}
		var pid int
		eventually(t, 5*time.Second, "LISTEN connection", func() bool { pid = listenerPID(t, observer, app); return pid != 0 })
		if _, err := observer.Exec(t.Context(), `SELECT pg_terminate_backend($1)`, pid); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "listener gone", func() bool { return listenerPID(t, observer, app) == 0 })
		start := time.Now()
		publish(t, pub, topic, newMsg("1"))
		receive(t, ch, 2*time.Second).Ack()
		t.Logf("without listener: delivered %s after publish", time.Since(start))
	})
}

// Publish inside a caller's pgx transaction (ContextWithTx): enqueued iff
// the transaction commits, and the NOTIFY arrives at commit.
func TestPublishInsideTx(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-tx", 4)
	pub := newPublisher(t, pool)
	sub := newSubscriber(t, pool, queue.SubscriberConfig{PollInterval: time.Minute})
	topic := "in-tx"
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // first empty claims done; only NOTIFY can wake them now

	for _, commit := range []bool{false, true} {
		tx, err := pool.Begin(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		m := newMsg(fmt.Sprintf("commit=%v", commit))
		queue.SetOrderingKey(m, "deal-1")
		m.SetContext(queue.ContextWithTx(t.Context(), tx))
		publish(t, pub, topic, m)
		if _, ok := readRow(t, pool, m.UUID); ok {
			t.Fatal("uncommitted message visible outside its transaction")
		}
		expectNone(t, ch, 300*time.Millisecond)
		if !commit {
			if err := tx.Rollback(t.Context()); err != nil {
				t.Fatal(err)
			}
			expectNone(t, ch, 300*time.Millisecond)
			if _, ok := readRow(t, pool, m.UUID); ok {
				t.Fatal("rolled-back message enqueued")
			}
			continue
		}
		if err := tx.Commit(t.Context()); err != nil {
			t.Fatal(err)
		}
		got := receive(t, ch, time.Second) // woken by the NOTIFY sent at commit
		if got.UUID != m.UUID {
			t.Fatalf("got %s, want %s", got.UUID, m.UUID)
		}
		got.Ack()
	}
}

// The relay case: a handler inside a watermill-sql subscription publishes
// through msg.Context(), so the enqueue commits together with the
// subscription's offset: invisible until the relay acks, then there once.
//
// (watermill-sql v4.1.2 redelivers a nacked message inside the same
// transaction and commits a transaction whose message was never acked when
// the subscriber closes, so an enqueue made before a Nack or a close is
// NOT rolled back: the relay must not nack after publishing, and saga
// handlers must deduplicate.)
func TestPublishInsideWatermillSQLSubscription(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-relay", 6)
	wlog := watermill.NewSlogLogger(testLogger())
	outboxPub, err := wsql.NewPublisher(wsql.BeginnerFromPgx(pool), wsql.PublisherConfig{SchemaAdapter: wsql.DefaultPostgreSQLSchema{}}, wlog)
	if err != nil {
		t.Fatal(err)
	}
	outboxSub, err := wsql.NewSubscriber(wsql.BeginnerFromPgx(pool), wsql.SubscriberConfig{
		ConsumerGroup:  "relay",
		SchemaAdapter:  wsql.DefaultPostgreSQLSchema{},
		OffsetsAdapter: wsql.DefaultPostgreSQLOffsetsAdapter{},
		PollInterval:   20 * time.Millisecond,
	}, wlog)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := outboxSub.Close(); err != nil {
			t.Error(err)
		}
	})
	wq := newPublisher(t, pool)

	event := message.NewMessage(watermill.NewUUID(), []byte(`{"deal":"d-1"}`))
	if err := outboxPub.Publish("outbox", event); err != nil {
		t.Fatal(err)
	}
	relayed, err := outboxSub.Subscribe(context.Background(), "outbox")
	if err != nil {
		t.Fatal(err)
	}
	countWork := func() int {
		var n int
		if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM work_queue WHERE topic = 'saga'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	m := receive(t, relayed, 5*time.Second)
	if _, ok := wsql.TxFromContext(m.Context()); !ok {
		t.Fatal("no watermill-sql transaction in the message context")
	}
	work := message.NewMessage(watermill.NewUUID(), m.Payload)
	work.SetContext(m.Context())
	publish(t, wq, "saga", work)
	if n := countWork(); n != 0 {
		t.Fatalf("%d work messages visible before the relay's transaction committed", n)
	}
	m.Ack()
	eventually(t, 5*time.Second, "the relayed message enqueued", func() bool { return countWork() == 1 })
	expectNone(t, relayed, 300*time.Millisecond) // the offset moved with the enqueue
	if n := countWork(); n != 1 {
		t.Fatalf("%d work messages, want 1", n)
	}
}

func TestStats(t *testing.T) {
	pool := newPool(t, newDatabase(t), "wq-stats", 4)
	pub := newPublisher(t, pool)
	publish(t, pub, "a", newMsg("1"), newMsg("2"), newMsg("3"))
	publish(t, pub, "b", newMsg("1"))
	if _, err := pool.Exec(t.Context(), `UPDATE work_queue SET available_at = now() - interval '10 s' WHERE topic = 'a'`); err != nil {
		t.Fatal(err)
	}
	sub := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 1})
	ch, err := sub.Subscribe(t.Context(), "b")
	if err != nil {
		t.Fatal(err)
	}
	m := receive(t, ch, 5*time.Second) // b's only message is now in flight

	stats, err := queue.Stats(t.Context(), pool)
	if err != nil {
		t.Fatal(err)
	}
	if len(stats) != 2 || stats[0].Topic != "a" || stats[1].Topic != "b" {
		t.Fatalf("stats = %+v", stats)
	}
	a, b := stats[0], stats[1]
	if a.Depth != 3 || a.Available != 3 || a.InFlight != 0 || a.OldestAvailableAge < 9*time.Second {
		t.Errorf("a = %+v", a)
	}
	if b.Depth != 1 || b.Available != 0 || b.InFlight != 1 || b.OldestAvailableAge != 0 || b.MaxAttempts != 1 {
		t.Errorf("b = %+v", b)
	}
	m.Ack()
}

// TestOneQueryClaimsForEveryIdleConsumer: a subscription claims for all its
// idle consumers in one statement (rows claimed together share the
// statement's now(), hence one lease_until), never more than it has
// consumers, and never two messages of one ordering key at once.
func TestOneQueryClaimsForEveryIdleConsumer(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-batch", 4)
	topic := "batch"
	var msgs []*message.Message
	for i := range 9 {
		m := newMsg(strconv.Itoa(i))
		if i < 2 {
			queue.SetOrderingKey(m, "same-deal") // the second waits for the first's ack
		}
		msgs = append(msgs, m)
	}
	publish(t, newPublisher(t, pool), topic, msgs...)

	sub := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 6, PollInterval: time.Hour})
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	var held []*message.Message
	for range 6 {
		held = append(held, receive(t, ch, 5*time.Second))
	}
	var leased, leases int
	if err := pool.QueryRow(t.Context(), `SELECT count(*), count(DISTINCT lease_until) FROM work_queue
		WHERE topic = $1 AND lease_until IS NOT NULL`, topic).Scan(&leased, &leases); err != nil {
		t.Fatal(err)
	}
	if leased != 6 || leases != 1 {
		t.Errorf("%d rows leased with %d distinct lease times; want 6 claimed by one statement", leased, leases)
	}
	for _, m := range held {
		if m.UUID == msgs[1].UUID {
			t.Errorf("the second message of key same-deal was delivered while the first is held")
		}
	}
	select {
	case m := <-ch:
		t.Fatalf("a 7th message (%s) was delivered while all 6 consumers hold one", m.Payload)
	case <-time.After(300 * time.Millisecond):
	}
	for _, m := range held {
		m.Ack()
	}
	seen := map[string]bool{}
	for range 3 {
		m := receive(t, ch, 5*time.Second)
		seen[m.UUID] = true
		m.Ack()
	}
	if !seen[msgs[1].UUID] {
		t.Errorf("the second message of key same-deal was not delivered after the first's ack")
	}
}

// TestAckTx: a handler that acknowledges inside its own transaction. When
// the transaction commits, its write and the row's deletion land together
// and the Ack that follows leaves nothing to do; when it rolls back, the
// row is kept and the Nack that follows delays it as usual. A message not
// from a Subscriber is refused.
func TestAckTx(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-acktx", 4)
	ctx := t.Context()
	if _, err := pool.Exec(ctx, `CREATE TABLE effects (uuid text PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	topic := "acktx"
	committed, rolledBack, ackedAnyway := newMsg("commit"), newMsg("rollback"), newMsg("rollback, then Ack")
	publish(t, newPublisher(t, pool), topic, committed, rolledBack, ackedAnyway)
	sub := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 3, NackDelay: time.Hour})
	ch, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		m := receive(t, ch, 5*time.Second)
		if !queue.Delivered(m) {
			t.Fatal("a delivered message is not Delivered")
		}
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO effects VALUES ($1)`, m.UUID); err != nil {
			t.Fatal(err)
		}
		if err := queue.AckTx(ctx, tx, m); err != nil {
			t.Fatal(err)
		}
		if m.UUID == committed.UUID {
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			m.Ack()
		} else {
			if err := tx.Rollback(ctx); err != nil {
				t.Fatal(err)
			}
			if m.UUID == ackedAnyway.UUID {
				m.Ack() // e.g. a panic a middleware turned into an Ack
			} else {
				m.Nack()
			}
		}
		<-m.Context().Done()
	}
	eventually(t, 5*time.Second, "the message acked after its AckTx rolled back deleted by the Ack", func() bool {
		_, ok := readRow(t, pool, ackedAnyway.UUID)
		return !ok
	})
	eventually(t, 5*time.Second, "the committed message's row gone with its effect", func() bool {
		_, ok := readRow(t, pool, committed.UUID)
		return !ok
	})
	r, ok := readRow(t, pool, rolledBack.UUID)
	if !ok || r.leased || r.delayed < 50*time.Minute {
		t.Errorf("rolled-back message row %+v (exists %v), want kept, not leased, nacked for an hour", r, ok)
	}
	var effects []string
	rows, _ := pool.Query(ctx, `SELECT uuid FROM effects`)
	effects, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(effects) != 1 || effects[0] != committed.UUID {
		t.Errorf("effects %v (%v), want only the committed message's", effects, err)
	}

	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if queue.Delivered(newMsg("x")) || queue.AckTx(ctx, tx, newMsg("x")) == nil {
		t.Error("AckTx accepted a message that no Subscriber delivered")
	}
}

// TestClaimPlanIgnoresStaleStatistics: with the statistics of an empty
// queue (ANALYZE when empty) and a backlog of 5,000, a claim of 8 rows
// reads a handful of tuples, not the backlog. The same UPDATE planned
// freely (the positive control) reads the whole backlog, which is what made
// claims slow down as the backlog grew.
func TestClaimPlanIgnoresStaleStatistics(t *testing.T) {
	dbURL := newDatabase(t)
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := conn.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec(`ANALYZE work_queue`)
	exec(`INSERT INTO work_queue (topic, uuid, payload, ordering_key)
		SELECT 'plan', gen_random_uuid()::text, '\x', 'deal-' || g FROM generate_series(1, 5000) g`)
	tuplesRead := func() int64 {
		t.Helper()
		exec(`SELECT pg_stat_force_next_flush()`)
		exec(`SELECT pg_stat_clear_snapshot()`)
		var n int64
		if err := conn.QueryRow(ctx, `SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
			FROM pg_stat_user_tables WHERE relname = 'work_queue'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	claim := func(sql string) int64 {
		t.Helper()
		before := tuplesRead()
		rows, err := conn.Query(ctx, sql, pgx.QueryExecModeExec, "plan", int64(30e6), 8)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for rows.Next() {
			n++
		}
		if err := rows.Err(); err != nil || n != 8 {
			t.Fatalf("claimed %d rows (%v), want 8", n, err)
		}
		return tuplesRead() - before
	}
	const unpinned = `UPDATE work_queue AS q SET attempts = q.attempts + 1,
		lease_until = now() + $2 * interval '1 microsecond', claim_token = gen_random_uuid()
	FROM (SELECT c.id FROM work_queue AS c
		WHERE c.topic = $1 AND c.available_at <= now() AND (c.lease_until IS NULL OR c.lease_until <= now())
		  AND (c.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM work_queue AS o
			WHERE o.topic = c.topic AND o.ordering_key = c.ordering_key AND o.id < c.id))
		ORDER BY c.id LIMIT $3 FOR UPDATE SKIP LOCKED) AS next
	WHERE q.id = next.id RETURNING q.id`
	control := claim(unpinned)
	pinned := claim(`SELECT id FROM work_queue_claim($1, $2, $3)`)
	t.Logf("tuples read by a claim of 8 at a backlog of 5,000: %d planned freely, %d by work_queue_claim", control, pinned)
	if control < 1000 {
		t.Fatalf("positive control: the freely planned claim read only %d tuples; the measure cannot tell the plans apart", control)
	}
	if pinned > 200 {
		t.Errorf("work_queue_claim read %d tuples for 8 rows: its plan scans the backlog", pinned)
	}
}

// TestHandlerTimeout: a handler stuck on a call without a deadline gets its
// message's context cancelled (cause ErrHandlerTimeout) after
// HandlerTimeout, Nacks, and the message comes back for another attempt.
func TestHandlerTimeout(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-timeout", 4)
	topic := "timeout"
	sent := newMsg("slow")
	publish(t, newPublisher(t, pool), topic, sent)
	sub := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 1, HandlerTimeout: 300 * time.Millisecond, NackDelay: -1})
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	m := receive(t, ch, 5*time.Second)
	select {
	case <-m.Context().Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the stuck handler's context was not cancelled")
	}
	if cause := context.Cause(m.Context()); !errors.Is(cause, queue.ErrHandlerTimeout) {
		t.Fatalf("cause %v, want ErrHandlerTimeout", cause)
	}
	m.Nack()
	again := receive(t, ch, 5*time.Second)
	if again.UUID != sent.UUID || queue.Attempt(again) != 2 {
		t.Fatalf("redelivery %s attempt %d, want %s attempt 2", again.UUID, queue.Attempt(again), sent.UUID)
	}
	again.Ack()
}

// TestClaimNeverReturnsMoreThanAsked: sixteen sessions claim (up to 3 rows
// each) and give rows back concurrently, so claims meet rows updated under
// them. No claim may return more rows than asked, and no row may be held by
// two claims at once (its claim token is the fence).
func TestClaimNeverReturnsMoreThanAsked(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-claim-limit", 20)
	ctx := t.Context()
	if _, err := pool.Exec(ctx, `INSERT INTO work_queue (topic, uuid, payload)
		SELECT 'limit', gen_random_uuid()::text, '\x' FROM generate_series(1, 300)`); err != nil {
		t.Fatal(err)
	}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		held     = map[int64]bool{}
		problems []string
		claims   atomic.Int64
	)
	deadline := time.Now().Add(3 * time.Second)
	for range 16 {
		wg.Go(func() {
			for time.Now().Before(deadline) && ctx.Err() == nil {
				rows, err := pool.Query(ctx, `SELECT id, claim_token FROM work_queue_claim('limit', 30000000, 3)`)
				if err != nil {
					mu.Lock()
					problems = append(problems, err.Error())
					mu.Unlock()
					return
				}
				type got struct {
					id    int64
					token pgtype.UUID
				}
				gs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (got, error) {
					var g got
					return g, r.Scan(&g.id, &g.token)
				})
				if err != nil {
					mu.Lock()
					problems = append(problems, err.Error())
					mu.Unlock()
					return
				}
				claims.Add(1)
				mu.Lock()
				if len(gs) > 3 {
					problems = append(problems, fmt.Sprintf("a claim of 3 returned %d rows", len(gs)))
				}
				for _, g := range gs {
					if held[g.id] {
						problems = append(problems, fmt.Sprintf("row %d claimed while held", g.id))
					}
					held[g.id] = true
				}
				mu.Unlock()
				for _, g := range gs { // give it back, as a nack does
					mu.Lock()
					delete(held, g.id)
					mu.Unlock()
					if _, err := pool.Exec(ctx, `UPDATE work_queue SET lease_until = NULL, claim_token = NULL
						WHERE id = $1 AND claim_token = $2`, g.id, g.token); err != nil {
						mu.Lock()
						problems = append(problems, err.Error())
						mu.Unlock()
						return
					}
				}
			}
		})
	}
	wg.Wait()
	t.Logf("%d claims", claims.Load())
	if len(problems) > 0 {
		t.Fatalf("%d problem(s), first: %s", len(problems), problems[0])
	}
}

// TestHandlerIgnoringTimeoutLosesTheMessage: a handler that ignores its
// cancelled context does not keep its consumer: CloseTimeout after the
// HandlerTimeout the consumer stops extending the lease and moves on, and
// the message comes back when the lease lapses.
func TestHandlerIgnoringTimeoutLosesTheMessage(t *testing.T) {
	dbURL := newDatabase(t)
	pool := newPool(t, dbURL, "wq-ignore-timeout", 4)
	topic := "ignore-timeout"
	stuck, next := newMsg("stuck"), newMsg("next")
	publish(t, newPublisher(t, pool), topic, stuck)
	sub := newSubscriber(t, pool, queue.SubscriberConfig{Consumers: 1, Lease: time.Second,
		HandlerTimeout: 200 * time.Millisecond, CloseTimeout: 200 * time.Millisecond})
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	first := receive(t, ch, 5*time.Second) // never acked: the handler is stuck
	publish(t, newPublisher(t, pool), topic, next)
	got := map[string]int{}
	for range 2 {
		m := receive(t, ch, 10*time.Second)
		got[m.UUID]++
		m.Ack()
	}
	if got[next.UUID] != 1 || got[stuck.UUID] != 1 {
		t.Fatalf("deliveries after the stuck one: %v; want the next message and the stuck one again (lease lapsed)", got)
	}
	_ = first
}
