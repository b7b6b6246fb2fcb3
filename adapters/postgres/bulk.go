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

// Bulk re-inject throughput. RunBulkReinject runs bulkWorkers transactions
// at a time, each worker owning the deals whose hash falls in its
// partition (so every deal's entries are still re-injected one after the
// other, in order), and re-injects up to bulkBatch entries per
// transaction, set-based (runBatch): about six round trips per batch —
// begin, the items, every entry's reads and locks, every event appended,
// every projection, outbox message, audit row and item mark, commit —
// instead of two or more per entry, which is what bounded the run on a
// machine where a round trip costs more than the statements it carries
// (BenchmarkBulkReinject: 3.0 round trips and ~700 µs of CPU per entry,
// ~2,300 entries/s, became 0.26 and ~330 µs, ~4,000 entries/s). Only a
// batch with a refused entry runs again one entry at a time, each in a
// savepoint (reinjectTx). A batch that reinstates a deal locks the
// inventory rows of its SKUs from its reads to its commit; with one SKU
// for every deal, the batches of all workers queue for that row, and the
// larger batch (more reinstates per wait) is what keeps that queue short.
const (
	bulkWorkers = 4
	bulkBatch   = 32
	// bulkRetries bounds the retries of a batch that lost a deadlock (two
	// workers re-instating deals with common SKUs lock inventory rows in
	// different orders).
	bulkRetries = 20
)

// RunBulkReinject re-injects the pending items of operation id, oldest
// first per deal (so each deal's entries keep their order), at most
// perSecond per second (0: unlimited). Items of different deals run
// concurrently on up to bulkWorkers connections (one fewer than the pool
// has), up to bulkBatch items per transaction; each transaction also marks its
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
// ends early rather than wait for the next one with its transaction open.
// It returns how many items it handled and the last one's seq.
//
// Unless careful, it runs the items set-based, without savepoints
// (runBatch), and a refused item rolls the whole batch back with
// errRefusedInBatch: the caller runs it again carefully, each item on its
// own (reinjectTx) in a savepoint, so that the refused item is skipped
// without losing the transaction that records the skip; a careful batch
// commits after an item that locked inventory rows.
func (r *bulkRun) batch(ctx context.Context, w, after int, careful bool) (n, last int, err error) {
	var done []int
	err = r.s.unit(ctx, func(tx pgx.Tx) error {
		done, n, last = done[:0], 0, 0
		rows, err := tx.Query(ctx, `SELECT seq, dead_letter_id::text FROM bulk_operation_items
			WHERE operation_id=$1 AND state='pending' AND seq > $2 AND ($3 = 1 OR abs(hashtext(deal_id::text)) % $3 = $4)
			ORDER BY seq LIMIT $5 FOR UPDATE`, r.id, after, r.workers, w, bulkBatch)
		if err != nil {
			return err
		}
		items, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (bulkItem, error) {
			var it bulkItem
			return it, row.Scan(&it.seq, &it.dlID)
		})
		if err != nil {
			return err
		}
		p := newPipe(tx)
		if !careful {
			if done, err = r.runBatch(ctx, p, items); err != nil {
				return err
			}
			if len(done) > 0 {
				n, last = len(done), done[len(done)-1]
			}
		}
		for i, it := range items {
			if !careful {
				break
			}
			if i > 0 && !r.lim.Allow() {
				break
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
				break // commit soon: other workers' reinstates wait for these rows
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

// bulkItem is a pending item of a bulk operation.
type bulkItem struct {
	seq  int
	dlID string
}

// runBatch re-injects items, in order, without savepoints, in p's
// transaction, with a handful of round trips for the whole batch rather
// than two or more per entry:
//
//  1. the reads of every item, set-based: the entries' rows locked (the
//     state guard), their streams, their open entries' deals locked, and
//     — for the deals that are reverted, which a re-inject reinstates —
//     their inventory rows and sagas locked, in the order the one-entry
//     path locks them (deal, inventory in SKU order, saga);
//  2. the events of every re-inject appended (AppendAllTx: each its own
//     INSERT, so the hash chain trigger links it);
//  3. the projections of the events as the log stored them, with the
//     outbox messages, the audit rows and the caller's marking of the
//     items.
//
// Each entry is decided by planReinject, as a single re-inject is, from
// what 1 read — and, after an entry of the batch reinstated a deal (the
// only re-inject that changes a deal, its inventory or its saga), from
// those rows as that reinstate left them (heldLocks.fold: what its
// projections will write), as the one-by-one path would read them. An
// entry that would need a read the batch did not make ahead (a deal its
// row does not name) ends the batch after such a reinstate: the database
// does not hold the batch's changes yet. Entries that join a saga change
// only their own stream. It returns the seqs of the items re-injected. A
// refused item fails the batch with errRefusedInBatch.
func (r *bulkRun) runBatch(ctx context.Context, p *pipe, items []bulkItem) ([]int, error) {
	if len(items) == 0 {
		return nil, nil
	}
	ids := make([]string, len(items))
	streams := make([]string, len(items))
	reads := make(map[string]*reinjectRead, len(items))
	byStream := make(map[string]*reinjectRead, len(items))
	held := &heldLocks{stock: map[string]domain.Stock{}, sagas: map[string]int{}}
	deals := map[string]*domain.Deal{}
	for i, it := range items {
		if !validUUID(it.dlID) {
			return nil, fmt.Errorf("item %d: dead letter %q: %w", it.seq, it.dlID, domain.ErrNotFound)
		}
		rd := &reinjectRead{}
		ids[i], streams[i] = it.dlID, domain.DeadLetterStream(it.dlID)
		reads[it.dlID], byStream[streams[i]] = rd, rd
	}
	// A callback's error would make pgx forget the batch's prepared
	// statements: what is missing is reported by planReinject.
	dealOf := make(map[string]string, len(items)) // an entry's deal, as its row names it
	p.b.Queue(`SELECT id::text, coalesce(deal_id::text, '') FROM dead_letters WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE`, ids).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var id, deal string
			if err := rows.Scan(&id, &deal); err != nil {
				return fmt.Errorf("cannot lock dead letters: %w", err)
			}
			if rd := reads[id]; rd != nil {
				rd.found, dealOf[id] = true, deal
			}
		}
		return rows.Err()
	})
	p.b.Queue(`SELECT stream_id, type, schema_version, payload FROM events WHERE stream_id = ANY($1::text[])
		ORDER BY stream_id, stream_version`, streams).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var (
				stream, typ string
				sv          int
				payload     []byte
			)
			if err := rows.Scan(&stream, &typ, &sv, &payload); err != nil {
				return fmt.Errorf("cannot read event: %w", err)
			}
			rd := byStream[stream]
			if rd == nil {
				continue
			}
			e, err := domain.DecodeEvent(typ, sv, payload)
			if err != nil {
				return fmt.Errorf("event %d of %s: %w", len(rd.evs)+1, stream, err)
			}
			rd.evs = append(rd.evs, e)
		}
		return rows.Err()
	})
	// Each statement looks its rows up by primary key, from arrays (an
	// InitPlan each), and filters on nothing else an index could serve: its
	// plan cannot depend on statistics that a bulk run (or a fresh
	// database) leaves stale — with them, an index on state or status
	// looked selective and was scanned instead. The deals of the entries
	// that are not open are locked too: such an entry is refused, and the
	// batch rolled back (errRefusedInBatch).
	const entryDeals = `ARRAY(SELECT deal_id FROM dead_letters WHERE id = ANY($1::uuid[]))`
	const ifReverted = `SELECT CASE WHEN d.status='reverted' THEN d.%s END FROM deals d WHERE d.id = ANY(` + entryDeals + `)`
	p.b.Queue(dealColumns+` WHERE id = ANY(`+entryDeals+`) ORDER BY id FOR UPDATE`, ids).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			// A deal that cannot be read here is read again, and its
			// failure reported, by planReinject.
			if d, err := scanDeal(rows); err == nil {
				deals[d.ID()] = d
			}
		}
		return rows.Err()
	})
	// The same rows as lockDealStock would lock, for every reverted deal,
	// in SKU order (byte-wise, as Deal.Quantities sorts them).
	p.b.Queue(`SELECT sku, available, version FROM inventory
		WHERE sku = ANY(ARRAY(SELECT l->>'sku' FROM (`+fmt.Sprintf(ifReverted, "lines")+`) AS d(lines), jsonb_array_elements(d.lines) AS l))
		ORDER BY sku COLLATE "C" FOR UPDATE`, ids).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var st domain.Stock
			if err := rows.Scan(&st.SKU, &st.Available, &st.Version); err != nil {
				return fmt.Errorf("cannot lock inventory: %w", err)
			}
			held.stock[st.SKU] = st
		}
		return rows.Err()
	})
	p.b.Queue(`SELECT idempotency_key, version FROM invoice_sagas
		WHERE idempotency_key = ANY(ARRAY(`+fmt.Sprintf(ifReverted, "idempotency_key")+`))
		ORDER BY idempotency_key FOR UPDATE`, ids).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var (
				key string
				v   int
			)
			if err := rows.Scan(&key, &v); err != nil {
				return fmt.Errorf("cannot lock sagas: %w", err)
			}
			held.sagas[key] = v
		}
		return rows.Err()
	})
	if err := p.send(ctx); err != nil {
		return nil, err
	}

	var (
		done    []int
		changes []domain.Change
		changed bool // a deal was reinstated by an entry of this batch
	)
	for i, it := range items {
		if i > 0 && !r.lim.Allow() {
			break
		}
		rd := *reads[it.dlID]
		// The deal read ahead, if any (planReinject checks that it is the
		// deal of the revision), with the locks of its reinstate.
		if d := deals[dealOf[it.dlID]]; d != nil {
			rd.deal = d
			if d.Status() == domain.StatusReverted {
				rd.held = held
			}
		}
		rd.aheadOnly = changed
		plan, err := planReinject(ctx, p, it.dlID, r.opt, r.actor, rd)
		if errors.Is(err, errNotReadAhead) {
			break // the next batch re-injects it, reading what this one wrote
		}
		if err != nil {
			if refusal(err) {
				return nil, errRefusedInBatch
			}
			return nil, fmt.Errorf("item %d: %w", it.seq, err)
		}
		if _, err := plan.finish(ctx, p, r.opt, r.actor); err != nil {
			return nil, fmt.Errorf("item %d: %w", it.seq, err)
		}
		changes = append(changes, plan.changes...)
		done = append(done, it.seq)
		if plan.reinstated {
			if plan.deal != deals[plan.deal.ID()] || rd.held == nil {
				break // not read ahead: its state is in the database only
			}
			// The next entries see the deal, its inventory and saga as
			// this re-inject leaves them, as they would read them from the
			// projections it writes.
			held.fold(plan.deal, plan.changes)
			changed = true
		}
	}
	if err := p.appendAndProject(ctx, r.actor.meta(), changes...); err != nil {
		return nil, fmt.Errorf("items %d-%d: %w", done[0], done[len(done)-1], err)
	}
	return done, nil
}

// fold applies a reinstate's changes to the deal d and the locked rows,
// as the projections of their events do to the tables.
func (h *heldLocks) fold(d *domain.Deal, changes []domain.Change) {
	for _, c := range changes {
		v := c.ExpectedVersion + len(c.Events)
		for _, e := range c.Events {
			switch e := e.(type) {
			case domain.DealReinstated:
				d.Apply(e)
			case domain.InventoryAllocated:
				st := h.stock[e.SKU]
				st.SKU, st.Available, st.Version = e.SKU, st.Available-e.Quantity, v
				h.stock[e.SKU] = st
			case domain.InvoiceSagaResumed:
				h.sagas[e.IdempotencyKey] = v
			}
		}
	}
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
