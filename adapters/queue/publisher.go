package queue

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sync/atomic"

	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PublisherConfig configures a [Publisher]. The zero value is ready to use;
// there is nothing to configure yet.
type PublisherConfig struct{}

// Publisher enqueues messages into the work_queue table. It is safe for
// concurrent use.
type Publisher struct {
	pool   *pgxpool.Pool
	log    *slog.Logger
	closed atomic.Bool
}

var _ message.Publisher = (*Publisher)(nil)

// ErrClosed is returned by Publish and Subscribe after Close.
var ErrClosed = errors.New("queue: closed")

// advisoryLockClass is the first key of the two-key transaction-level
// advisory lock that serialises publishers of one (topic, ordering key).
const advisoryLockClass int32 = 0x57510001

// NewPublisher returns a Publisher that writes through pool when a message
// does not carry a transaction. A nil logger means slog.Default().
func NewPublisher(pool *pgxpool.Pool, cfg PublisherConfig, logger *slog.Logger) (*Publisher, error) {
	if pool == nil {
		return nil, errors.New("queue: nil pool")
	}
	return &Publisher{pool: pool, log: cmp.Or(logger, slog.Default())}, nil
}

// Publish enqueues msgs on topic. Guarantees:
//
//   - A message whose context carries a transaction, either a watermill-sql
//     one (wsql.TxFromContext, as in a watermill-sql subscription) or a pgx
//     one placed by [ContextWithTx], is inserted inside that transaction: it
//     is enqueued exactly when that transaction commits, and the wake-up
//     NOTIFY is delivered at that commit. In a transaction of a
//     [DeferringBeginner] the insert is held and sent with the
//     transaction's next statement; its error is reported there.
//   - Other messages are inserted, together with their NOTIFY, in one
//     transaction per run of consecutive messages: when Publish returns nil
//     they are durably enqueued; on error, messages of earlier runs may be.
//   - Messages with an ordering key take a transaction-level advisory lock
//     on (topic, key) before they are inserted, so two transactions
//     enqueuing the same key are serialised and ids of one key follow
//     commit order. Keys are locked in sorted order within one call; a
//     caller that publishes several keys across several calls in one
//     transaction may see a deadlock error, which rolls back that
//     transaction.
//
// Publish uses the context of the first message of each run for its queries.
func (p *Publisher) Publish(topic string, msgs ...*message.Message) error {
	if p.closed.Load() {
		return ErrClosed
	}
	if topic == "" {
		return errors.New("queue: empty topic")
	}
	for len(msgs) > 0 {
		ex := executorFor(msgs[0].Context(), p.pool)
		n := 1
		for n < len(msgs) && sameExecutor(executorFor(msgs[n].Context(), p.pool), ex) {
			n++
		}
		if err := p.publish(msgs[0].Context(), ex, topic, msgs[:n]); err != nil {
			return err
		}
		msgs = msgs[n:]
	}
	return nil
}

// Close makes further Publish calls fail. It does not close the pool, which
// belongs to the caller.
func (p *Publisher) Close() error {
	p.closed.Store(true)
	return nil
}

// executor is where the statements of one publish run: a pgx batch sender
// (pool, pgx.Tx) or a database/sql-style watermill-sql transaction.
type executor any

// sameExecutor reports whether a and b are the same transaction (or pool).
func sameExecutor(a, b executor) bool {
	ta, tb := reflect.TypeOf(a), reflect.TypeOf(b)
	return ta == tb && ta.Comparable() && a == b
}

// executorFor picks the transaction carried by ctx, or the pool. The result
// is comparable, so consecutive messages of one transaction can be batched.
func executorFor(ctx context.Context, pool *pgxpool.Pool) executor {
	if tx, ok := wsql.TxFromContext(ctx); ok {
		if d, ok := tx.(*DeferringTx); ok {
			return d
		}
		if ptx, ok := pgxOf(tx); ok {
			return ptx
		}
		return tx
	}
	if tx, ok := txFromContext(ctx); ok {
		return tx
	}
	return pool
}

type row struct {
	uuid     string
	payload  []byte
	metadata []byte
	key      *string
}

const insertSQL = `INSERT INTO work_queue (topic, uuid, payload, metadata, ordering_key) VALUES ($1, $2, $3, $4, $5)`

const lockSQL = `SELECT pg_advisory_xact_lock($1::int4, hashtext($2 || chr(31) || $3))`

const notifySQL = `SELECT pg_notify('` + NotifyChannel + `', $1)`

func (p *Publisher) publish(ctx context.Context, ex executor, topic string, msgs []*message.Message) error {
	rows := make([]row, 0, len(msgs))
	var keys []string
	for _, m := range msgs {
		md := map[string]string(m.Metadata)
		if md == nil {
			md = map[string]string{}
		}
		mdJSON, err := json.Marshal(md)
		if err != nil {
			return fmt.Errorf("queue: cannot encode metadata of message %s: %w", m.UUID, err)
		}
		payload := []byte(m.Payload)
		if payload == nil {
			payload = []byte{} // the column is NOT NULL; pgx sends nil as NULL
		}
		r := row{uuid: m.UUID, payload: payload, metadata: mdJSON}
		if k := m.Metadata.Get(MetadataOrderingKey); k != "" {
			r.key = &k
			keys = append(keys, k)
		}
		rows = append(rows, r)
	}
	slices.Sort(keys)
	keys = slices.Compact(keys)

	var err error
	switch ex := ex.(type) {
	case *DeferringTx:
		err = ex.hold(ctx, topic, keys, rows) // sent by its next statement or its commit
	case interface {
		SendBatch(context.Context, *pgx.Batch) pgx.BatchResults
	}:
		err = publishBatch(ctx, ex, topic, keys, rows)
	case wsql.Tx:
		err = publishExec(ctx, ex, topic, keys, rows)
	default:
		err = fmt.Errorf("unsupported transaction type %T", ex)
	}
	if err != nil {
		return fmt.Errorf("queue: cannot publish %d message(s) to %q: %w", len(msgs), topic, err)
	}
	return nil
}

// publishBatch sends every statement in one round trip. On the pool the
// batch runs as one implicit transaction; in a pgx.Tx it runs inside it.
func publishBatch(ctx context.Context, ex interface {
	SendBatch(context.Context, *pgx.Batch) pgx.BatchResults
}, topic string, keys []string, rows []row) (err error) {
	b := &pgx.Batch{}
	queueInserts(b, topic, keys, rows)
	b.Queue(notifySQL, topic)
	res := ex.SendBatch(ctx, b)
	defer func() { err = errors.Join(err, res.Close()) }()
	for range b.Len() {
		if _, err := res.Exec(); err != nil {
			return err
		}
	}
	return nil
}

// queueInserts queues the inserts of one publish in b: the advisory locks
// of its ordering keys (sorted), then its rows in order.
func queueInserts(b *pgx.Batch, topic string, keys []string, rows []row) {
	for _, k := range keys {
		b.Queue(lockSQL, advisoryLockClass, topic, k)
	}
	for _, r := range rows {
		b.Queue(insertSQL, topic, r.uuid, r.payload, r.metadata, r.key)
	}
}

// publishExec runs the statements one by one in a watermill-sql transaction
// that is not backed by pgx (database/sql).
func publishExec(ctx context.Context, tx wsql.Tx, topic string, keys []string, rows []row) error {
	for _, k := range keys {
		if _, err := tx.ExecContext(ctx, lockSQL, advisoryLockClass, topic, k); err != nil {
			return err
		}
	}
	for _, r := range rows {
		var key any
		if r.key != nil {
			key = *r.key
		}
		if _, err := tx.ExecContext(ctx, insertSQL, topic, r.uuid, r.payload, string(r.metadata), key); err != nil {
			return err
		}
	}
	_, err := tx.ExecContext(ctx, notifySQL, topic)
	return err
}
