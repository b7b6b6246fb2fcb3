package projections

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"runtime/debug"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/domain"
)

// Replay: every projection rebuilt from the event log (invariant I6).
//
// A replay reads the log in ONE repeatable-read, read-only transaction: a
// consistent snapshot that holds no transaction id, so it never delays the
// relay (I5) however long it runs. It rebuilds UNLOGGED copies of the
// tables of Tables() in ShadowSchema, starting from empty tables, in one of
// two ways that give the same tables (TestFoldEqualsApply):
//
//   - fold (the default): Options.Writers goroutines, each owning a
//     partition of the streams (partitionOf), fold the events into rows in
//     memory with foldEvent, Apply's twin (fold.go); the final rows are
//     then written with COPY, so Postgres only sorts and sends the log and
//     loads the final rows. Every row of the projections is held in memory
//     until the COPY.
//   - apply (Options.OneByOne, and the fallback whenever the fold meets
//     something it does not model exactly): the events are folded with
//     Apply — the very code that maintains the live tables — in short write
//     transactions of Options.BatchSize events with pipelined statements,
//     through Options.Writers connections that each own a partition.
//
// The tests in this package are the evidence that replay equals live:
// realistic concurrent runs, then --verify.
//
// Order. events.position is a sequence value and not commit order: a
// transaction may take its position, then wait for a row lock held by a
// transaction with a later position. Each appending transaction takes a
// commit sequence number at pre-commit, while it still holds its locks
// (migration 00007), so ordering by (commit_seq, position) orders every two
// transactions that touched a common row the way they committed; events of
// one transaction keep their append order. Events written before migration
// 00007 have no commit number and come first, in position order.
//
// Verify compares the shadow tables with the live tables AS OF THE SAME
// SNAPSHOT (live tables are read in the replay's transaction, and the
// projections are written in the same transactions as their events), so it
// can run against a busy system: per-table checksums first, then the
// differing rows by primary key, column by column.
//
// Swap replaces the live tables' contents with the rebuilt ones atomically:
// in one transaction it locks the live tables and the log (writers wait;
// the lock is retried with a short lock_timeout so that it never deadlocks
// a writer), applies the events committed since the snapshot to the shadow
// tables, then truncates the live tables and copies the shadow rows in.
// Table identities (grants, foreign keys, other sessions' prepared
// statements) survive, because no table is renamed or dropped.

// ShadowSchema is where a replay builds its tables.
const ShadowSchema = "dealbridge_shadow"

// replayLockKey serialises replays (pg_try_advisory_lock).
const replayLockKey = 0x6462_7265706c6179 // "db" "replay"

// Options configures Replay.
type Options struct {
	// Verify compares the rebuilt tables with the live ones.
	Verify bool
	// Swap replaces the live tables' contents with the rebuilt ones.
	Swap bool
	// BatchSize is the number of events per shadow write transaction
	// (default 1000: short transactions keep the chains of row versions
	// short, which measurably speeds the fold up).
	BatchSize int
	// Writers is the number of connections folding events in parallel
	// (default 2), each owning a partition of the streams (see partitionOf).
	Writers int
	// MaxDiffRows is the number of differing rows reported per table
	// (default 20); all of them are counted.
	MaxDiffRows int
	// Progress, when set, is called about every ProgressEvery (default 1s)
	// during the rebuild, and once at its end.
	Progress      func(Progress)
	ProgressEvery time.Duration
	// Schema is the shadow schema (default ShadowSchema). It is dropped and
	// re-created.
	Schema string
	// Tables overrides Tables() (tests).
	Tables []string
	// OneByOne rebuilds with Apply, event by event, as the live path does,
	// instead of folding in memory and writing the final rows with COPY
	// (fold.go). Slower; the two give the same tables (TestFoldEqualsApply),
	// and a rebuild falls back to it by itself whenever the fold does not
	// model a log exactly.
	OneByOne bool
}

// Rebuild methods (Report.Method).
const (
	// MethodFold folds the events in memory and writes the rows with COPY.
	MethodFold = "fold"
	// MethodApply runs Apply's statements event by event.
	MethodApply = "apply"
)

// Progress of a running rebuild.
type Progress struct {
	Done, Total int64
	Elapsed     time.Duration
}

// Report is what a replay did and found.
type Report struct {
	Snapshot     string        `json:"snapshot"`
	LiveSchema   string        `json:"live_schema"`
	ShadowSchema string        `json:"shadow_schema"`
	Events       int64         `json:"events"`
	Elapsed      time.Duration `json:"rebuild_ns"`
	// Method is how the rebuild ran (MethodFold or MethodApply), and
	// Fallback why it did not fold in memory when it did not.
	Method   string `json:"method"`
	Fallback string `json:"fallback,omitempty"`
	Verified bool   `json:"verified"`
	Swapped  bool   `json:"swapped"`
	// CaughtUp counts the events committed after the snapshot and applied
	// during the swap.
	CaughtUp int64         `json:"caught_up,omitempty"`
	Tables   []TableReport `json:"tables"`
}

// TableReport compares one table.
type TableReport struct {
	Name            string    `json:"name"`
	LiveRows        int64     `json:"live_rows"`
	RebuiltRows     int64     `json:"rebuilt_rows"`
	LiveChecksum    string    `json:"live_checksum,omitempty"`
	RebuiltChecksum string    `json:"rebuilt_checksum"`
	Changed         int64     `json:"changed,omitempty"`
	OnlyLive        int64     `json:"only_live,omitempty"`
	OnlyRebuilt     int64     `json:"only_rebuilt,omitempty"`
	Diffs           []RowDiff `json:"diffs,omitempty"`
}

// Drift reports whether the live table differs from the rebuilt one.
func (t TableReport) Drift() bool { return t.Changed+t.OnlyLive+t.OnlyRebuilt > 0 }

// RowDiff is one row that differs.
type RowDiff struct {
	Key     string          `json:"key"`
	Kind    string          `json:"kind"` // changed, only_live, only_rebuilt
	Columns []ColumnDiff    `json:"columns,omitempty"`
	Row     json.RawMessage `json:"row,omitempty"`
}

// ColumnDiff is one column of a changed row.
type ColumnDiff struct {
	Column  string          `json:"column"`
	Live    json.RawMessage `json:"live"`
	Rebuilt json.RawMessage `json:"rebuilt"`
}

// Drift reports whether any table differs.
func (r Report) Drift() bool {
	for _, t := range r.Tables {
		if t.Drift() {
			return true
		}
	}
	return false
}

// EventsPerSecond is the rebuild's speed.
func (r Report) EventsPerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Events) / r.Elapsed.Seconds()
}

// Format writes a readable report.
func (r Report) Format(w io.Writer) {
	fmt.Fprintf(w, "rebuilt %d events into schema %s in %s (%.0f events/s), snapshot %s\n",
		r.Events, r.ShadowSchema, r.Elapsed.Round(time.Millisecond), r.EventsPerSecond(), r.Snapshot)
	if r.Fallback != "" {
		fmt.Fprintf(w, "  rebuilt event by event (%s)\n", r.Fallback)
	}
	for _, t := range r.Tables {
		switch {
		case !r.Verified:
			fmt.Fprintf(w, "  %-16s %8d rows rebuilt\n", t.Name, t.RebuiltRows)
		case !t.Drift():
			fmt.Fprintf(w, "  %-16s %8d rows  ok  (md5 %s)\n", t.Name, t.LiveRows, t.LiveChecksum)
		default:
			fmt.Fprintf(w, "  %-16s DRIFT: live %d rows (md5 %s), rebuilt %d rows (md5 %s): %d changed, %d only live, %d only rebuilt\n",
				t.Name, t.LiveRows, t.LiveChecksum, t.RebuiltRows, t.RebuiltChecksum, t.Changed, t.OnlyLive, t.OnlyRebuilt)
			for _, d := range t.Diffs {
				switch d.Kind {
				case "changed":
					fmt.Fprintf(w, "    changed %s:\n", d.Key)
					for _, c := range d.Columns {
						fmt.Fprintf(w, "      %s: live %s, rebuilt %s\n", c.Column, c.Live, c.Rebuilt)
					}
				case "only_live":
					fmt.Fprintf(w, "    only in live %s (no event produces it): %s\n", d.Key, d.Row)
				case "only_rebuilt":
					fmt.Fprintf(w, "    missing from live %s (the log produces it): %s\n", d.Key, d.Row)
				}
			}
			if n := t.Changed + t.OnlyLive + t.OnlyRebuilt; n > int64(len(t.Diffs)) {
				fmt.Fprintf(w, "    … and %d more\n", n-int64(len(t.Diffs)))
			}
		}
	}
	switch {
	case r.Verified && r.Drift():
		fmt.Fprintln(w, "DRIFT: the live projections differ from the event log's replay")
	case r.Verified:
		fmt.Fprintln(w, "verified: the live projections equal the event log's replay")
	}
	if r.Swapped {
		fmt.Fprintf(w, "swapped: the live projections now hold the replay (%d events committed after the snapshot applied)\n", r.CaughtUp)
	}
}

// Replay rebuilds every projection from the event log into the shadow
// schema and, as opts say, verifies it against the live tables and swaps it
// in. It uses dedicated connections made from pool's configuration: one
// reading, one for the shadow schema and Options.Writers folding.
func Replay(ctx context.Context, pool *pgxpool.Pool, opts Options) (Report, error) {
	if opts.BatchSize <= 0 {
		opts.BatchSize = 1000
	}
	if opts.MaxDiffRows <= 0 {
		opts.MaxDiffRows = 20
	}
	if opts.Writers <= 0 {
		opts.Writers = 2
	}
	if opts.ProgressEvery <= 0 {
		opts.ProgressEvery = time.Second
	}
	if opts.Schema == "" {
		opts.Schema = ShadowSchema
	}
	tables := opts.Tables
	if tables == nil {
		tables = Tables()
	}
	rep := Report{ShadowSchema: opts.Schema}

	connect := func() (*pgx.Conn, error) {
		cfg := pool.Config().ConnConfig.Copy()
		cfg.RuntimeParams["application_name"] = "dealbridge-replay"
		c, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("cannot connect: %w", err)
		}
		return c, nil
	}
	reader, err := connect()
	if err != nil {
		return rep, err
	}
	defer reader.Close(context.WithoutCancel(ctx))
	writer, err := connect()
	if err != nil {
		return rep, err
	}
	defer writer.Close(context.WithoutCancel(ctx))

	var locked bool
	if err := writer.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(replayLockKey)).Scan(&locked); err != nil {
		return rep, fmt.Errorf("cannot take the replay lock: %w", err)
	}
	if !locked {
		return rep, errors.New("another replay is running on this database")
	}
	// Unlock explicitly: closing the connection releases the lock only when
	// the server notices, after a next replay may already have tried it.
	defer func() {
		_, _ = writer.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, int64(replayLockKey))
	}()

	rtx, err := reader.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return rep, fmt.Errorf("cannot begin the replay snapshot: %w", err)
	}
	defer func() { _ = rtx.Rollback(context.WithoutCancel(ctx)) }()
	var total int64
	if err := rtx.QueryRow(ctx, `SELECT pg_current_snapshot()::text, (SELECT count(*) FROM events)`).Scan(&rep.Snapshot, &total); err != nil {
		return rep, fmt.Errorf("cannot read the event log: %w", err)
	}
	live, err := liveSchema(ctx, rtx, append([]string{"events", "event_commits"}, tables...))
	if err != nil {
		return rep, err
	}
	rep.LiveSchema = live
	shadow := pgx.Identifier{opts.Schema}.Sanitize()
	if err := createShadow(ctx, writer, live, opts.Schema, tables); err != nil {
		return rep, err
	}
	// Unqualified names (Apply's) resolve to the shadow schema only, never
	// to the live tables (the swap's catch-up runs on this session).
	if _, err := writer.Exec(ctx, `SET search_path TO `+shadow+`; SET synchronous_commit TO off`); err != nil {
		return rep, fmt.Errorf("cannot prepare the replay session: %w", err)
	}

	// The fold allocates a lot of short-lived garbage (decoded events,
	// statement arguments): collecting less often measurably speeds it up.
	defer debug.SetGCPercent(debug.SetGCPercent(400))
	start := time.Now()
	rep.Method = MethodFold
	if opts.OneByOne {
		rep.Method = MethodApply
	} else if why, err := foldSupported(ctx, writer, opts.Schema, tables); err != nil {
		return rep, err
	} else if why != "" {
		rep.Method, rep.Fallback = MethodApply, why
	}
	n, err := rebuild(ctx, rtx, connect, total, start, opts, rep.Method == MethodFold)
	if u := (*foldUnsupported)(nil); errors.As(err, &u) && ctx.Err() == nil {
		// Apply decides what this log means: start again, one by one.
		rep.Method, rep.Fallback = MethodApply, u.reason
		if err := createShadow(ctx, writer, live, opts.Schema, tables); err != nil {
			return rep, err
		}
		n, err = rebuild(ctx, rtx, connect, total, start, opts, false)
	}
	rep.Events, rep.Elapsed = n, time.Since(start)
	if err != nil {
		return rep, err
	}

	for _, t := range tables {
		tr, err := compareTable(ctx, rtx, writer, live, opts.Schema, t, opts.Verify, opts.MaxDiffRows)
		if err != nil {
			return rep, err
		}
		rep.Tables = append(rep.Tables, tr)
	}
	rep.Verified = opts.Verify
	if err := rtx.Rollback(ctx); err != nil {
		return rep, fmt.Errorf("cannot end the replay snapshot: %w", err)
	}
	if opts.Swap {
		rep.CaughtUp, err = swap(ctx, writer, live, opts.Schema, tables, rep.Snapshot)
		if err != nil {
			return rep, err
		}
		rep.Swapped = true
	}
	return rep, nil
}

// liveSchema finds the schema the live tables are in (they must share one).
func liveSchema(ctx context.Context, q pgx.Tx, tables []string) (string, error) {
	schema := ""
	for _, t := range tables {
		var s *string
		if err := q.QueryRow(ctx, `SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE c.oid = to_regclass($1)`, pgx.Identifier{t}.Sanitize()).Scan(&s); err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return "", fmt.Errorf("cannot find table %s: %w", t, err)
		}
		switch {
		case s == nil:
			return "", fmt.Errorf("table %s does not exist (are the migrations applied?)", t)
		case schema == "":
			schema = *s
		case schema != *s:
			return "", fmt.Errorf("table %s is in schema %s, not %s with the others", t, *s, schema)
		}
	}
	return schema, nil
}

// createShadow (re)creates the shadow schema with an empty UNLOGGED copy of
// each table: columns, defaults, constraints and generated columns, plus its
// unique indexes (which Apply's lookups and ON CONFLICT need). Other indexes
// are left out: they only slow the rebuild down.
func createShadow(ctx context.Context, conn *pgx.Conn, live, shadow string, tables []string) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("cannot begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	sh := pgx.Identifier{shadow}.Sanitize()
	if _, err := tx.Exec(ctx, `DROP SCHEMA IF EXISTS `+sh+` CASCADE; CREATE SCHEMA `+sh); err != nil {
		return fmt.Errorf("cannot create schema %s: %w", shadow, err)
	}
	for _, t := range tables {
		lt, st := pgx.Identifier{live, t}.Sanitize(), pgx.Identifier{shadow, t}.Sanitize()
		if _, err := tx.Exec(ctx, `CREATE UNLOGGED TABLE `+st+` (LIKE `+lt+` INCLUDING ALL EXCLUDING INDEXES EXCLUDING CONSTRAINTS) WITH (fillfactor = `+shadowFillFactor+`)`); err != nil {
			return fmt.Errorf("cannot create %s: %w", st, err)
		}
		rows, err := tx.Query(ctx, `SELECT pg_get_indexdef(i.indexrelid), quote_ident($1) || '.' || quote_ident($2)
			FROM pg_index i WHERE i.indrelid = $3::regclass AND i.indisunique ORDER BY i.indexrelid`, live, t, lt)
		if err != nil {
			return fmt.Errorf("cannot read the indexes of %s: %w", lt, err)
		}
		type def struct{ sql, qualified string }
		defs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (def, error) {
			var d def
			err := r.Scan(&d.sql, &d.qualified)
			return d, err
		})
		if err != nil {
			return fmt.Errorf("cannot read the indexes of %s: %w", lt, err)
		}
		for _, d := range defs {
			on := " ON " + d.qualified + " USING "
			if !strings.Contains(d.sql, on) {
				return fmt.Errorf("cannot copy index %q", d.sql)
			}
			if _, err := tx.Exec(ctx, strings.Replace(d.sql, on, " ON "+st+" USING ", 1)); err != nil {
				return fmt.Errorf("cannot copy index %q: %w", d.sql, err)
			}
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("cannot create schema %s: %w", shadow, err)
	}
	return nil
}

// shadowFillFactor leaves room on every page so that the many updates of
// one row during a replay are HOT updates (no index insertions): measured,
// it halves the cost of an update.
const shadowFillFactor = "30"

// replayOrder is the order events are folded in (see the package comment
// above Replay).
const replayOrder = ` ORDER BY c.commit_seq NULLS FIRST, e.position`

// selectEvents reads what a rebuild needs of each event (not its metadata).
const selectEvents = `SELECT e.position, e.stream_id, e.stream_version, e.type, e.schema_version, e.payload, e.recorded_at
	FROM events e LEFT JOIN event_commits c ON c.txid = e.txid`

// partitionOf names the owner of the rows an event's projection writes:
// the deal for a deal's stream and its invoice sagas' streams (K = deal id
// + ":" + close version), the stream itself otherwise. Events of one owner
// are folded in order by one writer; owners are independent, so writers
// fold them in parallel. This holds as long as every projection writes only
// rows of its event's owner (deals and invoice_sagas rows of the deal,
// inventory rows of the SKU, the alert's or dead letter's own row). A
// projection that writes across owners (a global counter, say) must come
// with a change here, or Options.Writers = 1; `replay --verify` in the
// tests is what notices a violation.
func partitionOf(streamID string) string {
	if k, ok := strings.CutPrefix(streamID, "invoice-"); ok {
		if i := strings.LastIndexByte(k, ':'); i > 0 {
			return "deal-" + k[:i]
		}
	}
	return streamID
}

// rebuild streams the log from rtx and folds it into the shadow tables,
// in memory (fold.go) and then with COPY when fold is set, otherwise one
// event at a time with Apply through opts.Writers connections of their own.
// Reading, decoding and folding run concurrently; events are partitioned by
// owner (partitionOf) among opts.Writers goroutines.
func rebuild(ctx context.Context, rtx pgx.Tx, connect func() (*pgx.Conn, error), total int64, start time.Time, opts Options, fold bool) (int64, error) {
	// Sorting the whole log is the one big step of the read; let it happen
	// in memory.
	if _, err := rtx.Exec(ctx, `SET LOCAL work_mem = '256MB'; SET LOCAL jit = off`); err != nil {
		return 0, fmt.Errorf("cannot set work_mem: %w", err)
	}
	shadow := pgx.Identifier{opts.Schema}.Sanitize()
	workers := make([]*pgx.Conn, opts.Writers)
	defer func() {
		for _, c := range workers {
			if c != nil {
				_ = c.Close(context.WithoutCancel(ctx))
			}
		}
	}()
	for i := range workers {
		c, err := connect()
		if err != nil {
			return 0, err
		}
		workers[i] = c
		if _, err := c.Exec(ctx, `SET search_path TO `+shadow+`; SET synchronous_commit TO off; SET jit = off`); err != nil {
			return 0, fmt.Errorf("cannot prepare a replay session: %w", err)
		}
	}

	chans := make([]chan []rawEvent, len(workers))
	for i := range chans {
		chans[i] = make(chan []rawEvent, 8)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return readLog(gctx, rtx, chans) })
	p := &progress{opts: opts, total: total, start: start}
	p.last.Store(time.Now().UnixNano())
	states := make([]*foldState, len(workers))
	for w, conn := range workers {
		ch := chans[w]
		if fold {
			states[w] = newFoldState()
			g.Go(func() error { return foldWorker(ch, states[w], p) })
		} else {
			g.Go(func() error { return applyWorker(ctx, gctx, conn, ch, opts.BatchSize, p) })
		}
	}
	if err := g.Wait(); err != nil {
		return p.done.Load(), fmt.Errorf("replay stopped after %d events: %w", p.done.Load(), err)
	}
	if fold {
		if err := copyAll(ctx, workers, opts.Schema, copyTables(states)); err != nil {
			return p.done.Load(), err
		}
	}
	if opts.Progress != nil {
		opts.Progress(Progress{Done: p.done.Load(), Total: total, Elapsed: time.Since(start)})
	}
	return p.done.Load(), nil
}

// readLog reads the log in replay order and sends it in chunks to chans,
// each event to the channel of its owner (partitionOf).
func readLog(ctx context.Context, rtx pgx.Tx, chans []chan []rawEvent) error {
	const chunk = 500
	defer func() {
		for _, ch := range chans {
			close(ch)
		}
	}()
	rows, err := rtx.Query(ctx, selectEvents+replayOrder)
	if err != nil {
		return fmt.Errorf("cannot read the event log: %w", err)
	}
	defer rows.Close()
	bufs := make([][]rawEvent, len(chans))
	send := func(i int) error {
		select {
		case chans[i] <- bufs[i]:
			bufs[i] = make([]rawEvent, 0, chunk)
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	h := fnv.New32a()
	for rows.Next() {
		r, err := scanRaw(rows)
		if err != nil {
			return err
		}
		h.Reset()
		_, _ = h.Write([]byte(partitionOf(r.rec.StreamID)))
		i := int(h.Sum32() % uint32(len(chans)))
		bufs[i] = append(bufs[i], r)
		if len(bufs[i]) >= chunk {
			if err := send(i); err != nil {
				return err
			}
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("cannot read the event log: %w", err)
	}
	for i := range bufs {
		if len(bufs[i]) > 0 {
			if err := send(i); err != nil {
				return err
			}
		}
	}
	return nil
}

// progress counts folded events and reports them every opts.ProgressEvery.
type progress struct {
	opts  Options
	total int64
	start time.Time
	done  atomic.Int64
	last  atomic.Int64
}

func (p *progress) add(n int) {
	done := p.done.Add(int64(n))
	last := p.last.Load()
	if p.opts.Progress != nil && time.Since(time.Unix(0, last)) >= p.opts.ProgressEvery &&
		p.last.CompareAndSwap(last, time.Now().UnixNano()) {
		p.opts.Progress(Progress{Done: done, Total: p.total, Elapsed: time.Since(p.start)})
	}
}

// foldWorker folds its partition's events into state.
func foldWorker(ch <-chan []rawEvent, state *foldState, p *progress) error {
	for recs := range ch {
		for _, raw := range recs {
			r, err := raw.decode()
			if err != nil {
				return err
			}
			if err := state.foldEvent(raw, r); err != nil {
				return err
			}
		}
		p.add(len(recs))
	}
	return nil
}

// copyAll writes the folded tables with COPY, spread over the connections.
func copyAll(ctx context.Context, conns []*pgx.Conn, schema string, tables []copyTable) error {
	jobs := make(chan copyTable, len(tables))
	for _, t := range tables {
		jobs <- t
	}
	close(jobs)
	g, gctx := errgroup.WithContext(ctx)
	for _, conn := range conns {
		g.Go(func() error {
			for t := range jobs {
				if err := copyOut(gctx, conn, schema, t); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return g.Wait()
}

// applyWorker folds its partition's events with Apply, in transactions of
// batchSize events with pipelined statements.
func applyWorker(ctx, gctx context.Context, conn *pgx.Conn, ch <-chan []rawEvent, batchSize int, p *progress) error {
	x := &batchExecer{}
	inTx := 0
	defer func() {
		if x.tx != nil {
			_ = x.tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	for recs := range ch {
		for _, raw := range recs {
			r, err := raw.decode()
			if err != nil {
				return err
			}
			if x.tx == nil {
				tx, err := conn.Begin(gctx)
				if err != nil {
					return fmt.Errorf("cannot begin: %w", err)
				}
				x.reset(tx)
			}
			x.cur = r
			if err := Apply(gctx, x, r); err != nil {
				return err
			}
			inTx++
			if inTx >= batchSize {
				if err := x.commit(gctx); err != nil {
					return err
				}
				inTx = 0
			}
		}
		p.add(len(recs))
	}
	if x.tx != nil {
		if err := x.commit(gctx); err != nil {
			return err
		}
	}
	return nil
}

// rawEvent is an event as read, before decoding (which the writers do, in
// parallel). A rebuild does not read the metadata: no projection uses it.
type rawEvent struct {
	rec     domain.RecordedEvent
	typ     string
	payload []byte
}

func scanRaw(rows pgx.Rows) (rawEvent, error) {
	var r rawEvent
	if err := rows.Scan(&r.rec.Position, &r.rec.StreamID, &r.rec.StreamVersion, &r.typ, &r.rec.SchemaVersion, &r.payload, &r.rec.RecordedAt); err != nil {
		return r, fmt.Errorf("cannot read event: %w", err)
	}
	return r, nil
}

func (raw rawEvent) decode() (domain.RecordedEvent, error) {
	r := raw.rec
	e, err := domain.DecodeEvent(raw.typ, r.SchemaVersion, raw.payload)
	if err != nil {
		return r, fmt.Errorf("event %d (%s/%d): %w", r.Position, r.StreamID, r.StreamVersion, err)
	}
	r.Event = e
	return r, nil
}

func scanEvent(rows pgx.Rows) (domain.RecordedEvent, error) {
	var (
		r         domain.RecordedEvent
		typ       string
		payload   []byte
		metaBytes []byte
	)
	if err := rows.Scan(&r.Position, &r.StreamID, &r.StreamVersion, &typ, &r.SchemaVersion, &payload, &metaBytes, &r.RecordedAt); err != nil {
		return r, fmt.Errorf("cannot read event: %w", err)
	}
	e, err := domain.DecodeEvent(typ, r.SchemaVersion, payload)
	if err != nil {
		return r, fmt.Errorf("event %d (%s/%d): %w", r.Position, r.StreamID, r.StreamVersion, err)
	}
	r.Event = e
	if err := json.Unmarshal(metaBytes, &r.Metadata); err != nil {
		return r, fmt.Errorf("event %d metadata: %w", r.Position, err)
	}
	return r, nil
}

// queuer is implemented by an Execer that pipelines exec1's statements.
type queuer interface {
	queue1(sql string, args []any) error
}

// batchExecer pipelines projection statements into pgx batches. Statements
// queued through exec1 have their one-row check done when the batch comes
// back; a direct Exec flushes the queue first, so the order of statements
// is always the order Apply issued them in.
type batchExecer struct {
	tx     pgx.Tx
	b      *pgx.Batch
	checks []domain.RecordedEvent
	cur    domain.RecordedEvent
}

func (x *batchExecer) reset(tx pgx.Tx) {
	x.tx, x.b, x.checks = tx, &pgx.Batch{}, x.checks[:0]
}

func (x *batchExecer) queue1(sql string, args []any) error {
	x.b.Queue(sql, args...)
	x.checks = append(x.checks, x.cur)
	return nil
}

func (x *batchExecer) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	if err := x.flush(ctx); err != nil {
		return pgconn.CommandTag{}, err
	}
	return x.tx.Exec(ctx, sql, args...)
}

func (x *batchExecer) flush(ctx context.Context) error {
	if x.b.Len() == 0 {
		return nil
	}
	br := x.tx.SendBatch(ctx, x.b)
	var failed error
	for _, r := range x.checks {
		tag, err := br.Exec()
		if err != nil {
			failed = fmt.Errorf("cannot project %s event %s/%d (position %d): %w", r.Event.EventType(), r.StreamID, r.StreamVersion, r.Position, err)
			break
		}
		if tag.RowsAffected() != 1 {
			failed = fmt.Errorf("cannot project %s event %s/%d (position %d): expected 1 row, touched %d",
				r.Event.EventType(), r.StreamID, r.StreamVersion, r.Position, tag.RowsAffected())
			break
		}
	}
	// Close also runs what follows the checked statements (ApplyPipelinedWith).
	if err := br.Close(); err != nil && failed == nil {
		failed = fmt.Errorf("projection batch: %w", err)
	}
	x.b, x.checks = &pgx.Batch{}, x.checks[:0]
	return failed
}

func (x *batchExecer) commit(ctx context.Context) error {
	if err := x.flush(ctx); err != nil {
		return err
	}
	err := x.tx.Commit(ctx)
	x.tx = nil
	if err != nil {
		return fmt.Errorf("cannot commit replay batch: %w", err)
	}
	return nil
}

// tableShape is what comparing and copying a table needs.
type tableShape struct {
	key  []string // primary key columns ("" → whole row)
	cols []string // insertable columns (not generated, not dropped)
}

func shapeOf(ctx context.Context, q interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}, qualified string) (tableShape, error) {
	var s tableShape
	rows, err := q.Query(ctx, `SELECT a.attname FROM pg_index i
		JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = $1::regclass AND i.indisprimary ORDER BY k.n`, qualified)
	if err != nil {
		return s, fmt.Errorf("cannot read the key of %s: %w", qualified, err)
	}
	if s.key, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		return s, fmt.Errorf("cannot read the key of %s: %w", qualified, err)
	}
	rows, err = q.Query(ctx, `SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0
		AND NOT attisdropped AND attgenerated = '' ORDER BY attnum`, qualified)
	if err != nil {
		return s, fmt.Errorf("cannot read the columns of %s: %w", qualified, err)
	}
	if s.cols, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		return s, fmt.Errorf("cannot read the columns of %s: %w", qualified, err)
	}
	return s, nil
}

func (s tableShape) keyExpr() string {
	if len(s.key) == 0 {
		return "t::text"
	}
	parts := make([]string, len(s.key))
	for i, k := range s.key {
		parts[i] = "t." + pgx.Identifier{k}.Sanitize()
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func checksum(ctx context.Context, q querier, qualified string, s tableShape) (int64, string, error) {
	var n int64
	var sum string
	err := q.QueryRow(ctx, `SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY `+s.keyExpr()+`), ''))
		FROM `+qualified+` t`).Scan(&n, &sum)
	if err != nil {
		return 0, "", fmt.Errorf("cannot checksum %s: %w", qualified, err)
	}
	return n, sum, nil
}

// compareTable counts (and, when verifying, compares) one table: live as of
// rtx's snapshot, rebuilt through writer.
func compareTable(ctx context.Context, rtx pgx.Tx, writer *pgx.Conn, live, shadow, table string, verify bool, maxDiffs int) (TableReport, error) {
	tr := TableReport{Name: table}
	lq, sq := pgx.Identifier{live, table}.Sanitize(), pgx.Identifier{shadow, table}.Sanitize()
	s, err := shapeOf(ctx, rtx, lq)
	if err != nil {
		return tr, err
	}
	if tr.RebuiltRows, tr.RebuiltChecksum, err = checksum(ctx, writer, sq, s); err != nil {
		return tr, err
	}
	if !verify {
		return tr, nil
	}
	if tr.LiveRows, tr.LiveChecksum, err = checksum(ctx, rtx, lq, s); err != nil {
		return tr, err
	}
	if tr.LiveChecksum == tr.RebuiltChecksum {
		return tr, nil
	}
	return diffTable(ctx, rtx, writer, lq, sq, s, tr, maxDiffs)
}

// diffTable walks both tables in key order (bytewise, COLLATE "C") and
// reports the rows that differ.
func diffTable(ctx context.Context, rtx pgx.Tx, writer *pgx.Conn, lq, sq string, s tableShape, tr TableReport, maxDiffs int) (TableReport, error) {
	q := func(table string) string {
		return `SELECT ` + s.keyExpr() + `::text, t::text, to_jsonb(t)::text FROM ` + table + ` t ORDER BY ` + s.keyExpr() + `::text COLLATE "C"`
	}
	lrows, err := rtx.Query(ctx, q(lq))
	if err != nil {
		return tr, fmt.Errorf("cannot read %s: %w", lq, err)
	}
	defer lrows.Close()
	srows, err := writer.Query(ctx, q(sq))
	if err != nil {
		return tr, fmt.Errorf("cannot read %s: %w", sq, err)
	}
	defer srows.Close()
	type row struct {
		key, text, js string
		ok            bool
	}
	next := func(rows pgx.Rows) (row, error) {
		var r row
		if !rows.Next() {
			return r, rows.Err()
		}
		r.ok = true
		return r, rows.Scan(&r.key, &r.text, &r.js)
	}
	l, err := next(lrows)
	if err != nil {
		return tr, err
	}
	sh, err := next(srows)
	if err != nil {
		return tr, err
	}
	add := func(d RowDiff) {
		if len(tr.Diffs) < maxDiffs {
			tr.Diffs = append(tr.Diffs, d)
		}
	}
	for l.ok || sh.ok {
		switch {
		case l.ok && (!sh.ok || l.key < sh.key):
			tr.OnlyLive++
			add(RowDiff{Key: keyText(s, l.js, l.key), Kind: "only_live", Row: json.RawMessage(l.js)})
			if l, err = next(lrows); err != nil {
				return tr, err
			}
		case sh.ok && (!l.ok || sh.key < l.key):
			tr.OnlyRebuilt++
			add(RowDiff{Key: keyText(s, sh.js, sh.key), Kind: "only_rebuilt", Row: json.RawMessage(sh.js)})
			if sh, err = next(srows); err != nil {
				return tr, err
			}
		default:
			if l.text != sh.text {
				tr.Changed++
				add(RowDiff{Key: keyText(s, l.js, l.key), Kind: "changed", Columns: columnDiffs(l.js, sh.js)})
			}
			if l, err = next(lrows); err != nil {
				return tr, err
			}
			if sh, err = next(srows); err != nil {
				return tr, err
			}
		}
	}
	return tr, nil
}

// keyText renders a row's key as col=value pairs.
func keyText(s tableShape, js, fallback string) string {
	if len(s.key) == 0 {
		return fallback
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(js), &m); err != nil {
		return fallback
	}
	parts := make([]string, len(s.key))
	for i, k := range s.key {
		parts[i] = k + "=" + strings.Trim(string(m[k]), `"`)
	}
	return strings.Join(parts, " ")
}

func columnDiffs(live, rebuilt string) []ColumnDiff {
	var l, r map[string]json.RawMessage
	if json.Unmarshal([]byte(live), &l) != nil || json.Unmarshal([]byte(rebuilt), &r) != nil {
		return []ColumnDiff{{Column: "(row)", Live: json.RawMessage(live), Rebuilt: json.RawMessage(rebuilt)}}
	}
	var out []ColumnDiff
	for k, lv := range l {
		if rv, ok := r[k]; !ok || string(rv) != string(lv) {
			out = append(out, ColumnDiff{Column: k, Live: lv, Rebuilt: orNull(rv)})
		}
	}
	for k, rv := range r {
		if _, ok := l[k]; !ok {
			out = append(out, ColumnDiff{Column: k, Live: json.RawMessage("null"), Rebuilt: rv})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Column < out[j].Column })
	return out
}

func orNull(b json.RawMessage) json.RawMessage {
	if b == nil {
		return json.RawMessage("null")
	}
	return b
}

// swap replaces the live tables' contents with the shadow tables', after
// applying to the shadow tables the events committed since snapshot. It
// returns how many such events there were.
func swap(ctx context.Context, conn *pgx.Conn, live, shadow string, tables []string, snapshot string) (int64, error) {
	for attempt := 1; ; attempt++ {
		n, err := trySwap(ctx, conn, live, shadow, tables, snapshot)
		var pgErr *pgconn.PgError
		if err != nil && errors.As(err, &pgErr) && (pgErr.Code == "55P03" || pgErr.Code == "40P01") && attempt < 100 {
			// Busy: writers hold the tables. Let them finish and try again.
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(time.Duration(50+rand.IntN(200)) * time.Millisecond):
			}
			continue
		}
		return n, err
	}
}

func trySwap(ctx context.Context, conn *pgx.Conn, live, shadow string, tables []string, snapshot string) (int64, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("cannot begin the swap: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	liveQ := make([]string, len(tables))
	for i, t := range tables {
		liveQ[i] = pgx.Identifier{live, t}.Sanitize()
	}
	events := pgx.Identifier{live, "events"}.Sanitize()
	commits := pgx.Identifier{live, "event_commits"}.Sanitize()
	// A short lock_timeout instead of a queue: a writer holding a row lock
	// of a projection table while it waits for the log lock would deadlock
	// with us; we give way and retry instead.
	if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '200ms'; SET LOCAL synchronous_commit TO on`); err != nil {
		return 0, err
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE `+strings.Join(liveQ, ", ")+` IN ACCESS EXCLUSIVE MODE`); err != nil {
		return 0, fmt.Errorf("cannot lock the live projections: %w", err)
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE `+events+` IN EXCLUSIVE MODE`); err != nil {
		return 0, fmt.Errorf("cannot lock the event log: %w", err)
	}
	// Catch up with the events committed after the snapshot.
	rows, err := tx.Query(ctx, `SELECT e.position, e.stream_id, e.stream_version, e.type, e.schema_version, e.payload, e.metadata, e.recorded_at
		FROM `+events+` e LEFT JOIN `+commits+` c ON c.txid = e.txid
		WHERE e.txid >= pg_snapshot_xmin($1::pg_snapshot) AND NOT pg_visible_in_snapshot(e.txid, $1::pg_snapshot)`+replayOrder, snapshot)
	if err != nil {
		return 0, fmt.Errorf("cannot read the events committed since the snapshot: %w", err)
	}
	var recs []domain.RecordedEvent
	for rows.Next() {
		r, err := scanEvent(rows)
		if err != nil {
			rows.Close()
			return 0, err
		}
		recs = append(recs, r)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, fmt.Errorf("cannot read the events committed since the snapshot: %w", err)
	}
	x := &batchExecer{}
	x.reset(tx)
	for _, r := range recs {
		x.cur = r
		if err := Apply(ctx, x, r); err != nil {
			return 0, err
		}
	}
	if err := x.flush(ctx); err != nil {
		return 0, err
	}
	if _, err := tx.Exec(ctx, `TRUNCATE `+strings.Join(liveQ, ", ")); err != nil {
		return 0, fmt.Errorf("cannot empty the live projections: %w", err)
	}
	for i, t := range tables {
		s, err := shapeOf(ctx, tx, liveQ[i])
		if err != nil {
			return 0, err
		}
		cols := make([]string, len(s.cols))
		for j, c := range s.cols {
			cols[j] = pgx.Identifier{c}.Sanitize()
		}
		cl := strings.Join(cols, ", ")
		if _, err := tx.Exec(ctx, `INSERT INTO `+liveQ[i]+` (`+cl+`) SELECT `+cl+` FROM `+pgx.Identifier{shadow, t}.Sanitize()); err != nil {
			return 0, fmt.Errorf("cannot copy %s into %s: %w", t, liveQ[i], err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("cannot commit the swap: %w", err)
	}
	return int64(len(recs)), nil
}
