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

// TestSavepointAfterItsTransactionEndedRunsNothing: a savepoint kept past
// the end of its unit refuses statements instead of running them in
// autocommit on the (released) connection; inside the unit, a savepoint
// rolled back undoes only its own write.
func TestSavepointAfterItsTransactionEndedRunsNothing(t *testing.T) {
	ctx := t.Context()
	pool := pgtest.NewPool(t)
	if _, err := pool.Exec(ctx, `CREATE TABLE sp_after (v int)`); err != nil {
		t.Fatal(err)
	}
	s := NewStore(pool)
	var kept pgx.Tx
	err := s.unit(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO sp_after VALUES (1)`); err != nil {
			return err
		}
		sp, err := tx.Begin(ctx)
		if err != nil {
			return err
		}
		if _, err := sp.Exec(ctx, `INSERT INTO sp_after VALUES (2)`); err != nil {
			return err
		}
		if err := sp.Rollback(ctx); err != nil {
			return err
		}
		kept, err = tx.Begin(ctx)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kept.Exec(ctx, `INSERT INTO sp_after VALUES (3)`); !errors.Is(err, pgx.ErrTxClosed) {
		t.Errorf("a statement through a savepoint of a committed unit: %v, want pgx.ErrTxClosed", err)
	}
	rows, err := pool.Query(ctx, `SELECT v FROM sp_after ORDER BY v`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0] != 1 {
		t.Errorf("rows %v, want [1]: the rolled-back savepoint's write gone, nothing written after the commit", got)
	}
}
