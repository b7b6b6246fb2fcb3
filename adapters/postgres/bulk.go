package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"golang.org/x/time/rate"

	"github.com/dealbridge/dealbridge/domain"
)

// BulkPlan is the dry run of a bulk re-inject: how many entries the filter
// selects, by error class.
type BulkPlan struct {
	Count        int            `json:"count"`
	ByErrorClass map[string]int `json:"by_error_class"`
}

// PlanBulkReinject counts the open entries the filter selects.
func (s *Store) PlanBulkReinject(ctx context.Context, f DeadLetterFilter) (BulkPlan, error) {
	f.State = domain.DLStateOpen
	if err := f.Validate(); err != nil {
		return BulkPlan{}, err
	}
	var args []any
	where := f.where(&args)
	rows, err := s.pool.Query(ctx, `SELECT error_class, count(*) FROM dead_letters WHERE `+where+` GROUP BY 1 ORDER BY 1`, args...)
	if err != nil {
		return BulkPlan{}, fmt.Errorf("cannot plan bulk re-inject: %w", err)
	}
	plan := BulkPlan{ByErrorClass: map[string]int{}}
	for rows.Next() {
		var c string
		var n int
		if err := rows.Scan(&c, &n); err != nil {
			rows.Close()
			return BulkPlan{}, fmt.Errorf("cannot plan bulk re-inject: %w", err)
		}
		plan.ByErrorClass[c] = n
		plan.Count += n
	}
	if err := rows.Err(); err != nil {
		return BulkPlan{}, fmt.Errorf("cannot plan bulk re-inject: %w", err)
	}
	return plan, nil
}

// StartBulkReinject records a bulk operation over the open entries the
// filter selects, in one transaction, ordered per deal by age. Nothing is
// re-injected yet: RunBulkReinject does that, and can be run again after a
// crash.
func (s *Store) StartBulkReinject(ctx context.Context, f DeadLetterFilter, reason string, a Actor) (string, int, error) {
	f.State = domain.DLStateOpen
	if err := f.Validate(); err != nil {
		return "", 0, err
	}
	if reason == "" {
		return "", 0, &domain.ValidationError{Field: "reason", Reason: "is required"}
	}
	if a.Name == "" {
		return "", 0, &domain.ValidationError{Field: "actor", Reason: "is required"}
	}
	id := watermill.NewUUID()
	fb, err := json.Marshal(f)
	if err != nil {
		return "", 0, fmt.Errorf("cannot encode filter: %w", err)
	}
	var total int
	err = s.unit(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO bulk_operations (id, kind, filter, actor, role, reason, state, total)
			VALUES ($1, 'reinject', $2, $3, $4, $5, 'running', 0)`, id, fb, a.Name, a.Role, reason); err != nil {
			return fmt.Errorf("cannot record bulk operation: %w", err)
		}
		var args []any
		where := f.where(&args)
		args = append(args, id)
		tag, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO bulk_operation_items (operation_id, seq, dead_letter_id, deal_id, state)
			SELECT $%d, row_number() OVER (ORDER BY created_at, id), id, deal_id, 'pending'
			FROM dead_letters WHERE `+where, len(args)), args...)
		if err != nil {
			return fmt.Errorf("cannot record bulk items: %w", err)
		}
		total = int(tag.RowsAffected())
		if _, err := tx.Exec(ctx, `UPDATE bulk_operations SET total=$2 WHERE id=$1`, id, total); err != nil {
			return fmt.Errorf("cannot record bulk operation: %w", err)
		}
		return auditTx(ctx, tx, a, "dead_letter.bulk_reinject.start", "bulk_operation", id, reason, nil, fb, nil, id)
	})
	if err != nil {
		return "", 0, fmt.Errorf("cannot start bulk re-inject: %w", err)
	}
	return id, total, nil
}

// BulkProgress reports a bulk operation's items by state.
type BulkProgress struct {
	OperationID string `json:"operation_id"`
	Total       int    `json:"total"`
	Done        int    `json:"done"`
	Skipped     int    `json:"skipped"`
	Pending     int    `json:"pending"`
}

// RunBulkReinject re-injects the pending items of operation id, oldest
// first (so each deal's entries keep their order), at most perSecond per
// second (0: unlimited). Each item is re-injected in its own transaction
// that also marks it done, so running it again after a crash re-injects
// every item exactly once. An item that can no longer be re-injected (its
// entry was discarded meanwhile, or hit the loop guard) is skipped with the
// reason. When ctx is cancelled it returns the progress so far and a nil
// error (check ctx.Err()): run it again to resume.
func (s *Store) RunBulkReinject(ctx context.Context, id string, perSecond float64, maxReinjects int, progress func(BulkProgress)) (BulkProgress, error) {
	var (
		reason, actor, role, state string
	)
	if !validUUID(id) {
		return BulkProgress{}, fmt.Errorf("bulk operation %q: %w", id, domain.ErrNotFound)
	}
	err := s.pool.QueryRow(ctx, `SELECT reason, actor, role, state FROM bulk_operations WHERE id=$1`, id).Scan(&reason, &actor, &role, &state)
	if errors.Is(err, pgx.ErrNoRows) {
		return BulkProgress{}, fmt.Errorf("bulk operation %s: %w", id, domain.ErrNotFound)
	}
	if err != nil {
		return BulkProgress{}, fmt.Errorf("cannot read bulk operation %s: %w", id, err)
	}
	a := Actor{Name: actor, Role: role}
	lim := rate.NewLimiter(rate.Inf, 1)
	if perSecond > 0 {
		lim = rate.NewLimiter(rate.Limit(perSecond), 1)
	}
	// An interruption (ctx cancelled) is not a failure: the progress so far
	// is returned with a nil error, and the caller resumes later.
	interrupted := func() (BulkProgress, error) { return s.BulkStatus(context.WithoutCancel(ctx), id) }
	for {
		if err := lim.Wait(ctx); err != nil {
			return interrupted()
		}
		var (
			seq  int
			dlID string
		)
		done := false
		err := s.unit(ctx, func(tx pgx.Tx) error {
			err := tx.QueryRow(ctx, `SELECT seq, dead_letter_id::text FROM bulk_operation_items
				WHERE operation_id=$1 AND state='pending' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED`, id).Scan(&seq, &dlID)
			if errors.Is(err, pgx.ErrNoRows) {
				done = true
				_, err = tx.Exec(ctx, `UPDATE bulk_operations SET state='done', updated_at=now() WHERE id=$1`, id)
				return err
			}
			if err != nil {
				return err
			}
			// A savepoint: a refused item is skipped without losing the
			// transaction that records the skip.
			sp, err := tx.Begin(ctx)
			if err != nil {
				return err
			}
			_, rerr := s.reinjectTx(ctx, sp, dlID, ReinjectOptions{Reason: reason, OperationID: id, MaxReinjects: maxReinjects}, a)
			if rerr != nil {
				_ = sp.Rollback(ctx)
				if !refusal(rerr) {
					return rerr
				}
				_, err = tx.Exec(ctx, `UPDATE bulk_operation_items SET state='skipped', detail=$3 WHERE operation_id=$1 AND seq=$2`, id, seq, rerr.Error())
				return err
			}
			if err := sp.Commit(ctx); err != nil {
				return err
			}
			_, err = tx.Exec(ctx, `UPDATE bulk_operation_items SET state='done' WHERE operation_id=$1 AND seq=$2`, id, seq)
			return err
		})
		if err != nil {
			if ctx.Err() != nil {
				return interrupted() // the item's transaction rolled back: still pending
			}
			return BulkProgress{}, fmt.Errorf("bulk operation %s, item %d: %w", id, seq, err)
		}
		if done {
			return s.BulkStatus(ctx, id)
		}
		if progress != nil && seq%100 == 0 {
			if p, err := s.BulkStatus(ctx, id); err == nil {
				progress(p)
			}
		}
	}
}

// refusal reports whether err is a business refusal (skip the item) rather
// than a failure (stop the run).
func refusal(err error) bool {
	var (
		v *domain.ValidationError
		t *domain.TransitionError
		s *domain.InsufficientStockError
	)
	return errors.Is(err, domain.ErrStateConflict) || errors.Is(err, domain.ErrReinjectLimit) ||
		errors.Is(err, domain.ErrApprovalRequired) || errors.Is(err, domain.ErrNotFound) ||
		errors.As(err, &v) || errors.As(err, &t) || errors.As(err, &s)
}

// BulkStatus returns a bulk operation's progress.
func (s *Store) BulkStatus(ctx context.Context, id string) (BulkProgress, error) {
	p := BulkProgress{OperationID: id}
	err := s.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE state='done'), count(*) FILTER (WHERE state='skipped'),
			count(*) FILTER (WHERE state='pending')
		FROM bulk_operation_items WHERE operation_id=$1`, id).Scan(&p.Total, &p.Done, &p.Skipped, &p.Pending)
	if err != nil {
		return BulkProgress{}, fmt.Errorf("cannot read bulk operation %s: %w", id, err)
	}
	return p, nil
}
