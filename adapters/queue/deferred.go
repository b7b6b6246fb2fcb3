package queue

import (
	"context"
	stdsql "database/sql"
	"errors"
	"fmt"
	"slices"

	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/jackc/pgx/v5"
)

// DeferringBeginner wraps a pgx-backed watermill-sql Beginner (from
// wsql.BeginnerFromPgx) so that, in the transactions it begins, a
// [Publisher] does not run its inserts one Publish at a time: it holds
// them, and the transaction sends every held insert in one round trip
// right before its next statement of its own, or before its commit.
//
// Nothing changes for what commits: the inserts run inside the same
// transaction, in publish order, before anything the transaction runs
// after them; an insert that fails fails that statement (or the commit),
// and the whole transaction rolls back. What changes is when an insert's
// error is seen: at the flush, not by Publish.
//
// It is meant for the relay: a watermill-sql subscription hands its
// transaction to the forwarder message by message, and the queue insert of
// each message cost its own round trip; the batch's offset update is the
// statement that now carries them all (with one NOTIFY per topic).
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

// DeferringTx is a transaction begun by a [DeferringBeginner]. It is not
// safe for concurrent use, like the transaction it wraps.
type DeferringTx struct {
	wsql.Tx
	pgx  pgx.Tx
	ctx  context.Context // the BeginTx context, for the flush before Commit
	held []heldPublish
}

type heldPublish struct {
	topic string
	keys  []string
	rows  []row
}

// hold keeps one Publish's rows for the next flush.
func (t *DeferringTx) hold(topic string, keys []string, rows []row) {
	t.held = append(t.held, heldPublish{topic: topic, keys: keys, rows: rows})
}

// Flush sends the held inserts now, in one round trip, and returns the
// transaction they ran in. Code that writes through the pgx transaction
// directly calls it first, so that its statements come after the held
// ones, as they were published.
func (t *DeferringTx) Flush(ctx context.Context) (pgx.Tx, error) {
	if len(t.held) == 0 {
		return t.pgx, nil
	}
	held := t.held
	t.held = nil
	b := &pgx.Batch{}
	var topics []string
	for _, h := range held {
		queueInserts(b, h.topic, h.keys, h.rows)
		if !slices.Contains(topics, h.topic) {
			topics = append(topics, h.topic)
		}
	}
	for _, topic := range topics {
		b.Queue(notifySQL, topic)
	}
	if err := t.pgx.SendBatch(ctx, b).Close(); err != nil {
		n := 0
		for _, h := range held {
			n += len(h.rows)
		}
		return nil, fmt.Errorf("queue: cannot publish %d held message(s): %w", n, err)
	}
	return t.pgx, nil
}

func (t *DeferringTx) ExecContext(ctx context.Context, query string, args ...any) (wsql.Result, error) {
	if _, err := t.Flush(ctx); err != nil {
		return nil, err
	}
	return t.Tx.ExecContext(ctx, query, args...)
}

func (t *DeferringTx) QueryContext(ctx context.Context, query string, args ...any) (wsql.Rows, error) {
	if _, err := t.Flush(ctx); err != nil {
		return nil, err
	}
	return t.Tx.QueryContext(ctx, query, args...)
}

// Commit sends what is held, then commits; if the inserts fail, it rolls
// back and nothing commits.
func (t *DeferringTx) Commit() error {
	if _, err := t.Flush(t.ctx); err != nil {
		return errors.Join(err, t.Tx.Rollback())
	}
	return t.Tx.Commit()
}

// Rollback drops what is held and rolls back.
func (t *DeferringTx) Rollback() error {
	t.held = nil
	return t.Tx.Rollback()
}
