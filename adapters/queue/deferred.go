package queue

import (
	"context"
	stdsql "database/sql"
	"errors"
	"fmt"
	"slices"
	"sync"

	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DeferringBeginner wraps a pgx-backed watermill-sql Beginner (from
// wsql.BeginnerFromPgx) so that, in the transactions it begins, a
// [Publisher] does not run its inserts one Publish at a time: it holds
// them, and the transaction sends every held insert, and one NOTIFY per
// topic, in the round trip of its next statement of its own (or of its
// commit).
//
// Nothing changes for what commits: the inserts run inside the same
// transaction, in publish order, before anything the transaction runs
// after them; an insert that fails fails that statement (or the commit),
// and the whole transaction rolls back. What changes is when an insert's
// error is seen: at the flush, not by Publish.
//
// It is meant for the relay: a watermill-sql subscription hands its
// transaction to the forwarder message by message, and the queue insert of
// each message cost its own round trip; the batch's offset update now
// carries them all. Add [UndoHeldOnError] to the subscription's handler.
func DeferringBeginner(b wsql.Beginner) wsql.Beginner { return deferringBeginner{b} }

type deferringBeginner struct{ wsql.Beginner }

func (b deferringBeginner) BeginTx(ctx context.Context, opts *stdsql.TxOptions) (wsql.Tx, error) {
	tx, err := b.Beginner.BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	ptx, ok := pgxOf(tx)
	if !ok {
		_ = tx.Rollback()
		return nil, fmt.Errorf("queue: DeferringBeginner needs a pgx transaction, got %T", tx)
	}
	return &DeferringTx{Tx: tx, pgx: ptx, ctx: ctx}, nil
}

// PgxTxOf returns the pgx transaction behind a watermill-sql one, for code
// that writes through pgx in a watermill-sql subscription's transaction.
// For a [DeferringTx] it first sends the inserts it holds, so that what
// the caller writes comes after them. ok is false for a transaction not
// backed by pgx.
func PgxTxOf(ctx context.Context, tx wsql.Tx) (_ pgx.Tx, ok bool, _ error) {
	if d, isDeferring := tx.(*DeferringTx); isDeferring {
		ptx, err := d.Flush(ctx)
		return ptx, err == nil, err
	}
	ptx, ok := pgxOf(tx)
	return ptx, ok, nil
}

// pgxOf is the pgx transaction behind a watermill-sql one.
func pgxOf(tx wsql.Tx) (pgx.Tx, bool) {
	switch t := tx.(type) {
	case *wsql.PgxTx:
		return t.Tx, true
	case wsql.PgxTx:
		return t.Tx, true
	}
	return nil, false
}

// DeferringTx is a transaction begun by a [DeferringBeginner]. Its methods
// may be called from several goroutines (a handler that outlives its
// message's deadline and the subscription's own offset update), and are
// serialised.
type DeferringTx struct {
	wsql.Tx
	pgx pgx.Tx
	ctx context.Context // the BeginTx context, for the flush before Commit

	mu     sync.Mutex
	held   []heldPublish
	failed error // a flush that failed: the transaction must not commit
	ended  bool  // committed or rolled back
}

type heldPublish struct {
	topic string
	keys  []string
	rows  []row
}

// errEnded: a publish into a transaction that has committed or rolled
// back.
var errEnded = errors.New("queue: the transaction has ended")

// hold keeps one Publish's rows for the next flush. It refuses when ctx is
// done, as a statement would, and once the transaction has ended.
func (t *DeferringTx) hold(ctx context.Context, topic string, keys []string, rows []row) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.ended:
		return errEnded
	case t.failed != nil:
		return t.failed
	}
	t.held = append(t.held, heldPublish{topic: topic, keys: keys, rows: rows})
	return nil
}

// mark and undo drop the inserts held since mark (see UndoHeldOnError).
func (t *DeferringTx) mark() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.held)
}

func (t *DeferringTx) undo(mark int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if mark <= len(t.held) { // else sent already: nothing to take back
		t.held = t.held[:mark]
	}
}

// Flush sends the held inserts now, in one round trip, and returns the
// transaction they ran in. Code that writes through the pgx transaction
// directly calls it first (see [PgxTxOf]), so that its statements come
// after the held ones, as they were published.
//
// A failed flush fails the transaction for good, even when nothing reached
// the server (a cancelled context): every later statement and the commit
// report the error, and the commit rolls back, so that the offset update
// can never commit without the inserts held before it.
func (t *DeferringTx) Flush(ctx context.Context) (pgx.Tx, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, err := t.flushLocked(ctx, "")
	return t.pgx, err
}

// flushLocked sends the held inserts, one NOTIFY per topic and then, when
// query is not empty, query itself, all in one round trip; it returns
// query's result.
func (t *DeferringTx) flushLocked(ctx context.Context, query string, args ...any) (pgconn.CommandTag, error) {
	switch {
	case t.failed != nil:
		return pgconn.CommandTag{}, t.failed
	case t.ended:
		return pgconn.CommandTag{}, errEnded
	case len(t.held) == 0 && query == "":
		return pgconn.CommandTag{}, nil
	case len(t.held) == 0:
		return t.pgx.Exec(ctx, query, args...)
	}
	b := &pgx.Batch{}
	var topics []string
	n := 0
	for _, h := range t.held {
		queueInserts(b, h.topic, h.keys, h.rows)
		if !slices.Contains(topics, h.topic) {
			topics = append(topics, h.topic)
		}
		n += len(h.rows)
	}
	for _, topic := range topics {
		b.Queue(notifySQL, topic)
	}
	if query != "" {
		b.Queue(query, args...)
	}
	t.held = nil
	br := t.pgx.SendBatch(ctx, b)
	var (
		tag pgconn.CommandTag
		err error
	)
	for range b.Len() {
		if tag, err = br.Exec(); err != nil {
			break
		}
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.failed = fmt.Errorf("queue: %d held message(s) and the statements sent with them: %w", n, err)
		return pgconn.CommandTag{}, t.failed
	}
	return tag, nil
}

// ExecContext runs query after the held inserts, in their round trip.
func (t *DeferringTx) ExecContext(ctx context.Context, query string, args ...any) (wsql.Result, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	tag, err := t.flushLocked(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return wsql.PgxResult{CommandTag: tag}, nil
}

func (t *DeferringTx) QueryContext(ctx context.Context, query string, args ...any) (wsql.Rows, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := t.flushLocked(ctx, ""); err != nil {
		return nil, err
	}
	return t.Tx.QueryContext(ctx, query, args...)
}

// Commit sends what is held, then commits; if the inserts fail (now or in
// an earlier flush), it rolls back and nothing commits.
func (t *DeferringTx) Commit() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := t.flushLocked(t.ctx, ""); err != nil {
		t.ended = true
		return errors.Join(err, t.Tx.Rollback())
	}
	t.ended = true
	return t.Tx.Commit()
}

// Rollback drops what is held and rolls back.
func (t *DeferringTx) Rollback() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.held, t.ended = nil, true
	return t.Tx.Rollback()
}

// UndoHeldOnError is a handler middleware for subscriptions whose
// transactions come from a [DeferringBeginner]: when the handler returns
// an error, the inserts it held are dropped. watermill-sql redelivers a
// nacked message in the same transaction, and would otherwise enqueue it a
// second time. (Inserts already sent by a flush inside the handler cannot
// be taken back; they commit, or not, with the transaction.) Add it first,
// so that it sees what the other middlewares make of the handler's error.
func UndoHeldOnError(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		tx, _ := wsql.TxFromContext(msg.Context())
		d, ok := tx.(*DeferringTx)
		if !ok {
			return h(msg)
		}
		mark := d.mark()
		out, err := h(msg)
		if err != nil {
			d.undo(mark)
		}
		return out, err
	}
}
