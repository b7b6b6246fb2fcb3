package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sync/errgroup"
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

// Bulk re-inject throughput. Re-injecting one entry (reinjectTx) takes
// seven statements, but only two round trips: its reads go together with
// the previous entry's last writes (pipe), then its events are appended.
// RunBulkReinject runs bulkWorkers transactions at a time, each worker
// owning the deals whose hash falls in its partition (so every deal's
// entries are still re-injected one after the other, in order), and
// re-injects up to bulkBatch entries per transaction, without a savepoint
// per entry unless one is refused (BenchmarkBulkReinject). A transaction
// that reinstated a deal holds its inventory rows, which every other
// worker reinstating a deal with a common SKU waits for: it commits after
// that entry instead of carrying on with its batch (with one SKU for all
// deals, waiting for those locks had bounded the run at ~1,400 entries/s).
const (
	bulkWorkers = 4
	bulkBatch   = 16
	// bulkRetries bounds the retries of a batch that lost a deadlock (two
	// workers re-instating deals with common SKUs lock inventory rows in
	// different orders).
	bulkRetries = 20
)

// RunBulkReinject re-injects the pending items of operation id, oldest
// first per deal (so each deal's entries keep their order), at most
// perSecond per second (0: unlimited). Items of different deals run
// concurrently on up to bulkWorkers connections (one fewer than the pool
// has), several items per transaction; each transaction also marks its
// items done, so running it again after a crash re-injects every item
// exactly once. An item that can no longer be re-injected (its entry was
// discarded meanwhile, or hit the loop guard) is skipped with the reason.
// When ctx is cancelled it returns the progress so far and a nil error
// (check ctx.Err()): run it again to resume.
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
	// An interruption (ctx cancelled) is not a failure: the progress so far
	// is returned with a nil error, and the caller resumes later.
	interrupted := func() (BulkProgress, error) { return s.BulkStatus(context.WithoutCancel(ctx), id) }

	// Entries without a deal could belong to any deal's saga: with any of
	// them pending, the run keeps one global order, on one worker.
	workers := min(bulkWorkers, max(1, int(s.pool.Config().MaxConns)-1))
	var undealt bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM bulk_operation_items
		WHERE operation_id=$1 AND state='pending' AND deal_id IS NULL)`, id).Scan(&undealt); err != nil {
		if ctx.Err() != nil {
			return interrupted()
		}
		return BulkProgress{}, fmt.Errorf("cannot read bulk operation %s: %w", id, err)
	}
	if undealt {
		workers = 1
	}
	lim := rate.NewLimiter(rate.Inf, 1)
	if perSecond > 0 {
		lim = rate.NewLimiter(rate.Limit(perSecond), 1)
	}
	r := &bulkRun{s: s, id: id, opt: ReinjectOptions{Reason: reason, OperationID: id, MaxReinjects: maxReinjects},
		actor: Actor{Name: actor, Role: role}, lim: lim, workers: workers, progress: progress}
	g, gctx := errgroup.WithContext(ctx)
	for w := range workers {
		g.Go(func() error { return r.work(gctx, w) })
	}
	if err := g.Wait(); err != nil {
		if ctx.Err() != nil || errors.Is(err, errBulkInterrupted) {
			return interrupted() // a batch's transaction rolled back: its items are still pending
		}
		return BulkProgress{}, err
	}
	if ctx.Err() != nil {
		return interrupted()
	}
	if err := s.unit(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE bulk_operations SET state='done', updated_at=now() WHERE id=$1`, id)
		return err
	}); err != nil {
		if ctx.Err() != nil {
			return interrupted()
		}
		return BulkProgress{}, fmt.Errorf("bulk operation %s: %w", id, err)
	}
	return s.BulkStatus(ctx, id)
}

// bulkRun is one run of a bulk operation, shared by its workers.
type bulkRun struct {
	s        *Store
	id       string
	opt      ReinjectOptions
	actor    Actor
	lim      *rate.Limiter
	workers  int
	progress func(BulkProgress)

	mu        sync.Mutex // serialises progress calls
	processed int        // items done or skipped by this run
}

// work re-injects the pending items of partition w, batch after batch, in
// seq order. after is the last seq this worker has handled: its partition's
// items up to there are done or skipped. Items are locked without SKIP
// LOCKED: an item still held by the transaction of an interrupted run (its
// backend not yet gone) is waited for, never overtaken by the deal's next
// entry. A last pass from the start is a safety net for anything pending
// behind the cursor.
func (r *bulkRun) work(ctx context.Context, w int) error {
	after, fromStart := 0, false
	for {
		if err := r.lim.Wait(ctx); err != nil {
			return errBulkInterrupted // cancelled, or its deadline comes first
		}
		n, last, err := r.batchWithRetries(ctx, w, after)
		if err != nil {
			return err
		}
		if n == 0 {
			if fromStart || after == 0 {
				return nil
			}
			after, fromStart = 0, true
			continue
		}
		after = last
		r.advance(ctx, n)
	}
}

func (r *bulkRun) batchWithRetries(ctx context.Context, w, after int) (n, last int, err error) {
	careful := false
	for attempt := 1; ; attempt++ {
		n, last, err = r.batch(ctx, w, after, careful)
		if errors.Is(err, errRefusedInBatch) {
			// Run the batch again with a savepoint around each item, so
			// that the refused one is skipped and the others are kept.
			careful = true
			continue
		}
		var pgErr *pgconn.PgError
		if err != nil && ctx.Err() == nil && errors.As(err, &pgErr) && (pgErr.Code == "40P01" || pgErr.Code == "40001") && attempt < bulkRetries {
			// Lost a deadlock to another worker: the whole batch rolled
			// back; run it again.
			select {
			case <-ctx.Done():
				return 0, 0, ctx.Err()
			case <-time.After(time.Duration(attempt) * 5 * time.Millisecond):
			}
			continue
		}
		return n, last, err
	}
}

// errBulkInterrupted: a worker stopped because the run's context ends
// before the rate limit lets it go on.
var errBulkInterrupted = errors.New("bulk run interrupted")

// errRefusedInBatch: an item of a batch run without savepoints was refused.
var errRefusedInBatch = errors.New("an item of the batch was refused")

// batch re-injects, in one transaction, up to bulkBatch pending items of
// partition w with seq > after, and marks them done (or skipped). The
// caller has taken the rate limiter's token for the first item; a batch
// ends early rather than wait for the next one with its transaction open,
// and after an item that locked inventory rows. It returns how many items
// it handled and the last one's seq.
//
// Unless careful, it runs the items without savepoints (two round trips
// fewer per item), and a refused item rolls the whole batch back with
// errRefusedInBatch: the caller runs it again carefully, each item in a
// savepoint, so that the refused item is skipped without losing the
// transaction that records the skip.
func (r *bulkRun) batch(ctx context.Context, w, after int, careful bool) (n, last int, err error) {
	type item struct {
		seq  int
		dlID string
	}
	var done []int
	err = r.s.unit(ctx, func(tx pgx.Tx) error {
		done, n, last = done[:0], 0, 0
		rows, err := tx.Query(ctx, `SELECT seq, dead_letter_id::text FROM bulk_operation_items
			WHERE operation_id=$1 AND state='pending' AND seq > $2 AND ($3 = 1 OR abs(hashtext(deal_id::text)) % $3 = $4)
			ORDER BY seq LIMIT $5 FOR UPDATE`, r.id, after, r.workers, w, bulkBatch)
		if err != nil {
			return err
		}
		items, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (item, error) {
			var it item
			return it, row.Scan(&it.seq, &it.dlID)
		})
		if err != nil {
			return err
		}
		// Each item's last writes travel with the next item's reads, the
		// last item's with the marking of the items (pipe).
		p := newPipe(tx)
		for i, it := range items {
			if i > 0 && !r.lim.Allow() {
				break
			}
			if !careful {
				if _, err := r.s.reinjectTx(ctx, p, it.dlID, r.opt, r.actor); err != nil {
					if refusal(err) {
						return errRefusedInBatch
					}
					return fmt.Errorf("item %d: %w", it.seq, err)
				}
				done = append(done, it.seq)
				n, last = n+1, it.seq
				if p.lockedStock {
					break // commit soon: other workers' reinstates wait for these rows
				}
				continue
			}
			sp, err := tx.Begin(ctx)
			if err != nil {
				return err
			}
			sp1 := newPipe(sp)
			_, rerr := r.s.reinjectTx(ctx, sp1, it.dlID, r.opt, r.actor)
			if rerr == nil {
				rerr = sp1.send(ctx) // before the savepoint ends
			}
			if rerr != nil {
				_ = sp.Rollback(ctx)
				if !refusal(rerr) {
					return fmt.Errorf("item %d: %w", it.seq, rerr)
				}
				if _, err := tx.Exec(ctx, `UPDATE bulk_operation_items SET state='skipped', detail=$3 WHERE operation_id=$1 AND seq=$2`,
					r.id, it.seq, rerr.Error()); err != nil {
					return err
				}
			} else {
				if err := sp.Commit(ctx); err != nil {
					return err
				}
				done = append(done, it.seq)
			}
			n, last = n+1, it.seq
			if sp1.lockedStock && rerr == nil {
				break // as above
			}
		}
		if len(done) > 0 {
			p.queue("cannot mark items done", `UPDATE bulk_operation_items SET state='done' WHERE operation_id=$1 AND seq = ANY($2)`, r.id, done)
		}
		return p.send(ctx)
	})
	if errors.Is(err, errRefusedInBatch) {
		return 0, 0, err
	}
	if err != nil {
		return 0, 0, fmt.Errorf("bulk operation %s: %w", r.id, err)
	}
	return n, last, nil
}

// advance counts n handled items and reports progress about every 100.
func (r *bulkRun) advance(ctx context.Context, n int) {
	if r.progress == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	before := r.processed
	r.processed += n
	if r.processed/100 == before/100 {
		return
	}
	if p, err := r.s.BulkStatus(ctx, r.id); err == nil {
		r.progress(p)
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
