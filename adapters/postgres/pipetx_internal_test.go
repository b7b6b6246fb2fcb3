package postgres

import (
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

// TestUnitFirstBatchFailingBeforeItRunsRunsNothingOutsideATransaction: the
// first batch of a unit carries its BEGIN; when the batch fails before
// anything in it runs (a statement that does not parse), BEGIN did not run
// either. A unit that swallows that error must not then write outside a
// transaction: like pgx's own Tx after a failure, later statements are
// refused and the commit fails, and nothing is written. (Found in review:
// the first version inserted the row in autocommit.)
func TestUnitFirstBatchFailingBeforeItRunsRunsNothingOutsideATransaction(t *testing.T) {
	ctx := t.Context()
	pool := pgtest.NewPool(t)
	if _, err := pool.Exec(ctx, `CREATE TABLE never_began (v int)`); err != nil {
		t.Fatal(err)
	}
	s := NewStore(pool)
	var insertErr error
	err := s.unit(ctx, func(tx pgx.Tx) error {
		var b pgx.Batch
		b.Queue(`SELECT no_such_column FROM never_began`) // fails at Parse: nothing runs
		_ = tx.SendBatch(ctx, &b).Close()                 // swallowed on purpose
		_, insertErr = tx.Exec(ctx, `INSERT INTO never_began VALUES (1)`)
		return nil // swallowed too: the unit tries to commit
	})
	if !errors.Is(insertErr, errNeverBegan) {
		t.Errorf("a statement after the failed first batch: %v, want errNeverBegan", insertErr)
	}
	if !errors.Is(err, pgx.ErrTxCommitRollback) {
		t.Errorf("the unit's commit: %v, want pgx.ErrTxCommitRollback", err)
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM never_began`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("%d row(s) written by a unit whose transaction never began", n)
	}
}
