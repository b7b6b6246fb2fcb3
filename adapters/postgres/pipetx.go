package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// pipeTx is the transaction of a unit of work: a pgx.Tx whose BEGIN is not
// a round trip of its own. It is sent in front of the transaction's first
// batch (a unit usually starts by locking and reading in one batch), or
// just before its first single statement. Commit can carry statements that
// run right after the commit, in the same round trip (the relays'
// wake-up). Everything else is pgx's: statements run on the connection,
// savepoints are SAVEPOINT / RELEASE / ROLLBACK TO.
//
// Written by hand because pgx's own Tx always sends BEGIN on its own; on
// this kind of machine a round trip costs more than most statements.
type pipeTx struct {
	conn    *pgxpool.Conn
	started bool // BEGIN has been sent (alone or in front of a batch)
	done    bool // committed or rolled back
	sps     int  // savepoints taken, to name the next
}

var _ pgx.Tx = (*pipeTx)(nil)

// errNeverBegan: the transaction's first batch failed before anything in it
// ran (e.g. a statement that did not parse), BEGIN included. Like pgx's own
// transaction after a failed statement, it then refuses every statement and
// its commit fails, rather than let later statements run outside any
// transaction.
var errNeverBegan = errors.New("the transaction failed before it began (its first batch did not run); roll it back")

// inTx reports whether the server has the transaction open (or failed), as
// of the last statement: the truth, not what was sent.
func (t *pipeTx) inTx() bool {
	s := t.conn.Conn().PgConn().TxStatus()
	return s == 'T' || s == 'E'
}

// usable is nil when a statement may be sent.
func (t *pipeTx) usable() error {
	switch {
	case t.done:
		return pgx.ErrTxClosed
	case t.started && !t.inTx():
		return errNeverBegan
	}
	return nil
}

// begin sends BEGIN on its own, when the first statement is not a batch.
func (t *pipeTx) begin(ctx context.Context) error {
	if err := t.usable(); err != nil {
		return err
	}
	if t.started {
		return nil
	}
	t.started = true
	if _, err := t.conn.Exec(ctx, "begin"); err != nil {
		return fmt.Errorf("cannot begin transaction: %w", err)
	}
	return nil
}

func (t *pipeTx) SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	if err := t.usable(); err != nil {
		return &failedBatch{err: err}
	}
	if t.started {
		return t.conn.SendBatch(ctx, b)
	}
	t.started = true
	// BEGIN goes first in the same batch; its result is read here, so the
	// caller sees the results of its own statements only.
	withBegin := &pgx.Batch{QueuedQueries: make([]*pgx.QueuedQuery, 0, len(b.QueuedQueries)+1)}
	withBegin.Queue("begin")
	withBegin.QueuedQueries = append(withBegin.QueuedQueries, b.QueuedQueries...)
	br := t.conn.SendBatch(ctx, withBegin)
	if _, err := br.Exec(); err != nil {
		_ = br.Close()
		return &failedBatch{err: fmt.Errorf("cannot begin transaction: %w", err)}
	}
	return br
}

func (t *pipeTx) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	if err := t.begin(ctx); err != nil {
		return pgconn.CommandTag{}, err
	}
	return t.conn.Exec(ctx, sql, args...)
}

func (t *pipeTx) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if err := t.begin(ctx); err != nil {
		return nil, err
	}
	return t.conn.Query(ctx, sql, args...)
}

func (t *pipeTx) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if err := t.begin(ctx); err != nil {
		return errRow{err}
	}
	return t.conn.QueryRow(ctx, sql, args...)
}

func (t *pipeTx) CopyFrom(ctx context.Context, table pgx.Identifier, cols []string, src pgx.CopyFromSource) (int64, error) {
	if err := t.begin(ctx); err != nil {
		return 0, err
	}
	return t.conn.CopyFrom(ctx, table, cols, src)
}

func (t *pipeTx) Prepare(ctx context.Context, name, sql string) (*pgconn.StatementDescription, error) {
	if err := t.begin(ctx); err != nil {
		return nil, err
	}
	return t.conn.Conn().Prepare(ctx, name, sql)
}

// LargeObjects is not supported (no unit uses them): pgx builds its
// LargeObjects only around its own transactions.
func (t *pipeTx) LargeObjects() pgx.LargeObjects { return pgx.LargeObjects{} }

func (t *pipeTx) Conn() *pgx.Conn { return t.conn.Conn() }

// Begin starts a savepoint.
func (t *pipeTx) Begin(ctx context.Context) (pgx.Tx, error) {
	if err := t.begin(ctx); err != nil {
		return nil, err
	}
	t.sps++
	sp := &savepoint{tx: t, name: fmt.Sprintf("sp_%d", t.sps)}
	if _, err := t.conn.Exec(ctx, "savepoint "+sp.name); err != nil {
		return nil, err
	}
	return sp, nil
}

// Commit commits. A transaction that had failed is rolled back by the
// server: that is pgx.ErrTxCommitRollback, as with pgx's own Tx.
func (t *pipeTx) Commit(ctx context.Context) error {
	return t.commitThen(ctx)
}

// commitThen commits and, in the same round trip, runs after the commit
// the statements then (each in its own implicit transaction). Their
// failure is not the commit's: it is returned wrapped in errAfterCommit.
func (t *pipeTx) commitThen(ctx context.Context, then ...string) error {
	if t.done {
		return pgx.ErrTxClosed
	}
	t.done = true
	switch {
	case !t.started:
		return nil // nothing was sent: nothing to commit
	case !t.inTx():
		return pgx.ErrTxCommitRollback // it never began (errNeverBegan)
	}
	// One simple-protocol query string: COMMIT ends the transaction, and
	// each statement after it runs in an implicit transaction of its own
	// (the simple protocol's rule once a query string contains transaction
	// control). The result of each statement comes back, in order.
	results, err := t.conn.Conn().PgConn().Exec(ctx, strings.Join(append([]string{"commit"}, then...), "; ")).ReadAll()
	if len(results) == 0 {
		if err == nil {
			err = errors.New("no result for commit")
		}
		return err
	}
	if err := commitResult(results[0].CommandTag, results[0].Err); err != nil {
		return err
	}
	if err != nil {
		return &errAfterCommit{err}
	}
	return nil
}

func commitResult(tag pgconn.CommandTag, err error) error {
	if err != nil {
		return err
	}
	if tag.String() == "ROLLBACK" {
		return pgx.ErrTxCommitRollback
	}
	return nil
}

// errAfterCommit is the failure of a statement run after a successful
// commit: the transaction is durable.
type errAfterCommit struct{ err error }

func (e *errAfterCommit) Error() string { return "after commit: " + e.err.Error() }
func (e *errAfterCommit) Unwrap() error { return e.err }

func (t *pipeTx) Rollback(ctx context.Context) error {
	if t.done {
		return pgx.ErrTxClosed
	}
	t.done = true
	if !t.inTx() {
		return nil
	}
	_, err := t.conn.Exec(ctx, "rollback")
	return err
}

// savepoint is a pipeTx's nested transaction.
type savepoint struct {
	tx   *pipeTx
	name string
	done bool
}

var _ pgx.Tx = (*savepoint)(nil)

// usable is nil when a statement may be sent through the savepoint: it
// and its transaction are open. (A savepoint used after its transaction
// ended would otherwise run its statements outside any transaction.)
func (s *savepoint) usable() error {
	if s.done {
		return pgx.ErrTxClosed
	}
	return s.tx.usable()
}

func (s *savepoint) Begin(ctx context.Context) (pgx.Tx, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	return s.tx.Begin(ctx)
}

func (s *savepoint) Commit(ctx context.Context) error { return s.end(ctx, "release savepoint ") }

func (s *savepoint) Rollback(ctx context.Context) error { return s.end(ctx, "rollback to savepoint ") }

// end releases or rolls back to the savepoint.
func (s *savepoint) end(ctx context.Context, verb string) error {
	if err := s.usable(); err != nil {
		return err
	}
	s.done = true
	_, err := s.tx.conn.Exec(ctx, verb+s.name)
	return err
}

func (s *savepoint) CopyFrom(ctx context.Context, table pgx.Identifier, cols []string, src pgx.CopyFromSource) (int64, error) {
	if err := s.usable(); err != nil {
		return 0, err
	}
	return s.tx.conn.CopyFrom(ctx, table, cols, src)
}

func (s *savepoint) SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	if err := s.usable(); err != nil {
		return &failedBatch{err: err}
	}
	return s.tx.conn.SendBatch(ctx, b)
}

func (s *savepoint) LargeObjects() pgx.LargeObjects { return pgx.LargeObjects{} }

func (s *savepoint) Prepare(ctx context.Context, name, sql string) (*pgconn.StatementDescription, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	return s.tx.conn.Conn().Prepare(ctx, name, sql)
}

func (s *savepoint) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	if err := s.usable(); err != nil {
		return pgconn.CommandTag{}, err
	}
	return s.tx.conn.Exec(ctx, sql, args...)
}

func (s *savepoint) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	return s.tx.conn.Query(ctx, sql, args...)
}

func (s *savepoint) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if err := s.usable(); err != nil {
		return errRow{err}
	}
	return s.tx.conn.QueryRow(ctx, sql, args...)
}

func (s *savepoint) Conn() *pgx.Conn { return s.tx.conn.Conn() }

// failedBatch is the BatchResults of a batch that was not sent.
type failedBatch struct{ err error }

func (f *failedBatch) Exec() (pgconn.CommandTag, error) { return pgconn.CommandTag{}, f.err }
func (f *failedBatch) Query() (pgx.Rows, error)         { return nil, f.err }
func (f *failedBatch) QueryRow() pgx.Row                { return errRow{f.err} }
func (f *failedBatch) Close() error                     { return f.err }
func (f *failedBatch) Tx() pgx.Tx                       { return nil }

// errRow is a Row whose Scan fails with err.
type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }
