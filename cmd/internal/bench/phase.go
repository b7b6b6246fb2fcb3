package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// Contenders.
const (
	KindCeiling    = "ceiling"
	KindDealbridge = "dealbridge"
	KindRiver      = "river"
)

// Phase groups.
const (
	GroupMain    = "main"    // the contenders side by side
	GroupScaling = "scaling" // dealbridge's handler processes and relay batch sizes
)

// phase is one measurement.
type phase struct {
	kind     string
	group    string
	clients  int     // ceiling: concurrent clients
	round    int     // main comparison: 1-based round (0: not repeated)
	rate     float64 // end to end: offered deals/s; 0 is maximum rate
	handlers int     // dealbridge: handler processes
	batch    int     // dealbridge: relay batch size
	workers  int     // river: MaxWorkers
}

func (p phase) name() string {
	switch p.kind {
	case KindCeiling:
		return fmt.Sprintf("ceiling, %d clients%s", p.clients, p.roundName())
	case KindDealbridge:
		return fmt.Sprintf("dealbridge %s, %d handler(s), batch %d%s", p.rateName(), p.handlers, p.batch, p.roundName())
	}
	return fmt.Sprintf("river %s, MaxWorkers %d%s", p.rateName(), p.workers, p.roundName())
}

func (p phase) roundName() string {
	if p.round == 0 {
		return ""
	}
	return fmt.Sprintf(", round %d", p.round)
}

func (p phase) rateName() string {
	if p.rate == 0 {
		return "max rate"
	}
	return strconv.FormatFloat(p.rate, 'f', -1, 64) + "/s"
}

// tag names the phase's database.
func (p phase) tag() string {
	r := "max"
	if p.rate > 0 {
		r = strconv.Itoa(int(p.rate))
	}
	switch p.kind {
	case KindCeiling:
		return fmt.Sprintf("ceiling_c%d_r%d", p.clients, p.round)
	case KindDealbridge:
		return fmt.Sprintf("db_%s_h%d_b%d_r%d", r, p.handlers, p.batch, p.round)
	}
	return fmt.Sprintf("river_%s_w%d_r%d", r, p.workers, p.round)
}

// plan interleaves the phases so that machine noise hits every contender
// alike. The main comparison runs cfg.Rounds times: in each round the
// ceilings (every client count), then dealbridge and River at maximum
// rate, then at each fixed rate, the two contenders taking turns to go
// first (ABBA across rates and rounds); the ceilings run once more after
// the last round, so that every maximum-rate pair is bracketed by ceiling
// runs. Dealbridge's scaling and River with its other worker counts run
// once, after the rounds.
func plan(cfg Config) []phase {
	h0, b0 := cfg.Handlers[0], cfg.BatchSizes[0]
	db := func(rate float64, h, b int, g string, round int) phase {
		return phase{kind: KindDealbridge, group: g, rate: rate, handlers: h, batch: b, round: round}
	}
	rv := func(rate float64, round int) phase {
		return phase{kind: KindRiver, group: GroupMain, rate: rate, workers: cfg.RiverWorkers[0], round: round}
	}
	pair := func(rate float64, round int, dealbridgeFirst bool) []phase {
		if dealbridgeFirst {
			return []phase{db(rate, h0, b0, GroupMain, round), rv(rate, round)}
		}
		return []phase{rv(rate, round), db(rate, h0, b0, GroupMain, round)}
	}
	var ps []phase
	cs := cfg.CeilingClients
	ceilings := func(round int) {
		for _, c := range cs {
			ps = append(ps, phase{kind: KindCeiling, group: GroupMain, clients: c, round: round})
		}
	}
	for round := 1; round <= cfg.Rounds; round++ {
		ceilings(round)
		ps = append(ps, pair(0, round, round%2 == 1)...)
		for i, r := range cfg.Rates {
			ps = append(ps, pair(r, round, (i+round)%2 == 0)...)
		}
	}
	ceilings(cfg.Rounds + 1)
	for _, h := range cfg.Handlers[1:] {
		ps = append(ps, db(0, h, b0, GroupScaling, 0))
	}
	for _, b := range cfg.BatchSizes[1:] {
		ps = append(ps, db(0, h0, b, GroupScaling, 0))
	}
	for _, w := range cfg.RiverWorkers[1:] {
		ps = append(ps, phase{kind: KindRiver, group: GroupScaling, workers: w})
	}
	return ps
}

// PhaseResult is one phase's measurements.
type PhaseResult struct {
	Name      string  `json:"name"`
	Kind      string  `json:"kind"`
	Group     string  `json:"group"`
	Clients   int     `json:"clients,omitempty"`
	Round     int     `json:"round,omitempty"` // main comparison: 1-based round
	Rate      float64 `json:"offered_rate"`    // deals/s; 0: maximum rate
	Handlers  int     `json:"handlers,omitempty"`
	BatchSize int     `json:"relay_batch_size,omitempty"`
	Workers   int     `json:"river_max_workers,omitempty"`

	// Closed counts the closes of the measurement window (not the
	// warm-up); CloseRate is Closed / WindowSeconds.
	Closed        int     `json:"closed"`
	WindowSeconds float64 `json:"window_s"`
	CloseRate     float64 `json:"close_rate"`
	CloseErrors   int     `json:"close_errors"`
	FirstError    string  `json:"first_error,omitempty"`
	PoolExhausted bool    `json:"pool_exhausted,omitempty"`
	Behind        bool    `json:"generator_behind,omitempty"`
	// Sustained: for the ceiling, committed closes per second; end to end,
	// invoices recorded during the window per second of the window.
	Sustained float64 `json:"sustained_per_s"`
	// EndToEnd is Closed / (first close → last invoice of those deals).
	EndToEnd float64 `json:"end_to_end_per_s,omitempty"`
	// Latency: commit → invoice recorded, ms (end to end only).
	Latency *Quantiles `json:"latency_ms,omitempty"`
	// CloseLatency: the client's CloseDeal call, ms.
	CloseLatency Quantiles `json:"close_latency_ms"`
	// Lag: sampled every 250ms from the window's start to the drain's end:
	// dealbridge's relay lag (age of the oldest unrelayed outbox row), and
	// River's job lag (age of the oldest available job).
	LagKind  string  `json:"lag_kind,omitempty"`
	LagMax   float64 `json:"lag_max_s"`
	LagMean  float64 `json:"lag_mean_s"`
	DepthMax int     `json:"queue_depth_max"`
	// CPU over the window and the drain, seconds, by process group.
	CPU          []ProcStat `json:"processes"`
	CPUService   float64    `json:"cpu_service_s"`
	CPUERP       float64    `json:"cpu_erp_s"`
	CPUPostgres  float64    `json:"cpu_postgres_s"` // -1: not measurable (remote server)
	CPULoad      float64    `json:"cpu_load_generator_s"`
	BusySeconds  float64    `json:"busy_s"` // window + drain
	DrainSeconds float64    `json:"drain_s"`
	Drained      bool       `json:"drained"`
	Verify       Verify     `json:"verify"`
	Samples      []Sample   `json:"samples,omitempty"`
}

// ProcStat is one child process's CPU and peak RSS.
type ProcStat struct {
	Name       string  `json:"name"`
	CPUSeconds float64 `json:"cpu_s"`
	PeakRSS    int64   `json:"peak_rss_bytes"`
}

// Quantiles of a distribution, in ms.
type Quantiles struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func quantiles(ms []float64) Quantiles {
	if len(ms) == 0 {
		return Quantiles{}
	}
	slices.Sort(ms)
	q := func(p float64) float64 { return ms[min(len(ms)-1, int(p*float64(len(ms))))] }
	return Quantiles{N: len(ms), P50: q(0.50), P90: q(0.90), P99: q(0.99), Max: ms[len(ms)-1]}
}

// Verify is the exactly-once check of a phase: every deal the generator
// closed (warm-up included) was invoiced exactly once, in the database and
// in the ERP, and nothing else was.
type Verify struct {
	OK             bool     `json:"ok"`
	Expected       int      `json:"expected"` // successful closes, warm-up included
	WonEvents      int      `json:"won_events"`
	InvoiceEvents  int      `json:"invoice_events"`
	InvoicedDeals  int      `json:"invoiced_deals"`
	ERPCreates     int      `json:"erp_creates"`
	ERPKeys        int      `json:"erp_keys"`
	ERPMaxPerKey   int      `json:"erp_max_creates_per_key"`
	QueueLeft      int      `json:"queue_left"`
	Problems       []string `json:"problems,omitempty"`
	OutboxMessages int      `json:"outbox_messages,omitempty"` // ceiling
}

// Sample is one point of a phase's timeline (seconds from the window's
// start).
type Sample struct {
	T       float64 `json:"t"`
	Closed  int64   `json:"closed"`
	Pending int64   `json:"pending"` // deals won and not yet invoiced
	Lag     float64 `json:"lag_s"`
	Depth   int     `json:"depth"`
}

func (r *PhaseResult) summary() string {
	s := fmt.Sprintf("%.0f/s sustained, %d closed", r.Sustained, r.Closed)
	if r.Latency != nil {
		s += fmt.Sprintf(", p50 %.1fms p99 %.1fms", r.Latency.P50, r.Latency.P99)
	}
	if !r.Verify.OK {
		s += fmt.Sprintf(", VERIFY FAILED: %v", r.Verify.Problems)
	}
	return s
}

const warmupDeals = 40

func (h *harness) runPhase(ctx context.Context, p phase) (*PhaseResult, error) {
	db, err := h.newPhaseDB(ctx, p.tag())
	if err != nil {
		return nil, err
	}
	defer func() {
		if err := h.srv.dropDatabase(context.WithoutCancel(ctx), db); err != nil {
			h.log.Warn("bench: drop phase database", "err", err)
		}
	}()
	if p.kind == KindCeiling {
		return h.runCeiling(ctx, p, db)
	}
	return h.runEndToEnd(ctx, p, db)
}

func (h *harness) runCeiling(ctx context.Context, p phase, db string) (*PhaseResult, error) {
	pool, err := h.srv.newPool(ctx, db, "dealbridge-bench-load", int32(p.clients+2))
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	ids, err := openDeals(ctx, pool)
	if err != nil {
		return nil, err
	}
	store := postgres.NewStore(pool)
	warm := closedLoop(ctx, store, ids[:min(warmupDeals, len(ids))], p.clients, time.Minute, nil, 0)
	ids = ids[min(warmupDeals, len(ids)):]
	pg0, pgOK := h.srv.cpu()
	self0 := selfCPU()
	out := closedLoop(ctx, store, ids, p.clients, h.cfg.Phase, nil, 0)
	pg1, _ := h.srv.cpu()
	self1 := selfCPU()
	r := newResult(p, out)
	r.Sustained = r.CloseRate
	r.BusySeconds = r.WindowSeconds
	r.CPULoad = (self1 - self0).Seconds()
	r.CPUPostgres = -1
	if pgOK {
		r.CPUPostgres = (pg1 - pg0).Seconds()
	}
	r.Drained = true
	// The ceiling's check: one DealWon and one outbox message per close.
	v := &r.Verify
	v.Expected = len(warm.closed) + len(out.closed)
	if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM events WHERE type = $1), (SELECT count(*) FROM watermill_outbox)`,
		domain.TypeDealWon).Scan(&v.WonEvents, &v.OutboxMessages); err != nil {
		return nil, fmt.Errorf("verify: %w", err)
	}
	if v.WonEvents != v.Expected || v.OutboxMessages != v.Expected {
		v.Problems = append(v.Problems, fmt.Sprintf("%d closes succeeded, but %d DealWon events and %d outbox messages",
			v.Expected, v.WonEvents, v.OutboxMessages))
	}
	if warm.errors+out.errors > 0 {
		v.Problems = append(v.Problems, fmt.Sprintf("%d closes failed", warm.errors+out.errors))
	}
	v.OK = len(v.Problems) == 0
	return r, nil
}

func newResult(p phase, out loadOut) *PhaseResult {
	r := &PhaseResult{Name: p.name(), Kind: p.kind, Group: p.group, Clients: p.clients, Round: p.round, Rate: p.rate, Handlers: p.handlers,
		BatchSize: p.batch, Workers: p.workers, Closed: len(out.closed), CloseErrors: out.errors, PoolExhausted: out.exhausted, Behind: out.behind}
	if out.firstErr != nil {
		r.FirstError = out.firstErr.Error()
	}
	r.WindowSeconds = out.end.Sub(out.start).Seconds()
	if r.WindowSeconds > 0 {
		r.CloseRate = float64(r.Closed) / r.WindowSeconds
	}
	ms := make([]float64, len(out.closeLat))
	for i, d := range out.closeLat {
		ms[i] = float64(d.Microseconds()) / 1000
	}
	r.CloseLatency = quantiles(ms)
	return r
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// startContender starts the ERP simulator and the contender's processes.
func (h *harness) startContender(p phase, db string) (children []*child, erpURL string, err error) {
	prefix := fmt.Sprintf("%02d-%s", h.seq, p.tag())
	port, err := freePort()
	if err != nil {
		return nil, "", err
	}
	erpURL = "http://127.0.0.1:" + strconv.Itoa(port)
	level := "--log-level=" + h.cfg.ChildLogLevel
	stopAll := func() {
		for _, c := range children {
			_ = c.stop()
		}
	}
	sim, err := startChild(h.cfg.Bin, h.logDir, prefix, "erp-sim", "", "erp-sim", level, "--listen", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		return nil, "", err
	}
	children = append(children, sim)
	dbURL := "--database-url=" + h.srv.url(db)
	switch p.kind {
	case KindDealbridge:
		args := []string{"relay", dbURL, level, "--relay-batch-size", strconv.Itoa(p.batch)}
		if h.cfg.RelayPoll > 0 {
			args = append(args, "--relay-poll-interval", h.cfg.RelayPoll.String())
		}
		c, err := startChild(h.cfg.Bin, h.logDir, prefix, "relay", "dealbridge-relay", args...)
		if err != nil {
			stopAll()
			return nil, "", err
		}
		children = append(children, c)
		for i := range p.handlers {
			args := []string{"handler", dbURL, level, "--erp-url", erpURL, "--consumers", strconv.Itoa(h.cfg.Consumers)}
			if h.cfg.QueuePoll > 0 {
				args = append(args, "--queue-poll-interval", h.cfg.QueuePoll.String())
			}
			c, err := startChild(h.cfg.Bin, h.logDir, prefix, fmt.Sprintf("handler-%d", i+1), "dealbridge-handler", args...)
			if err != nil {
				stopAll()
				return nil, "", err
			}
			children = append(children, c)
		}
	case KindRiver:
		args := []string{"bench", "river-worker", dbURL, level, "--erp-url", erpURL, "--workers", strconv.Itoa(p.workers)}
		if h.cfg.RiverFetchCooldown > 0 {
			args = append(args, "--fetch-cooldown", h.cfg.RiverFetchCooldown.String())
		}
		if h.cfg.RiverFetchPoll > 0 {
			args = append(args, "--fetch-poll-interval", h.cfg.RiverFetchPoll.String())
		}
		c, err := startChild(h.cfg.Bin, h.logDir, prefix, "river-worker", riverAppName, args...)
		if err != nil {
			stopAll()
			return nil, "", err
		}
		children = append(children, c)
	}
	return children, erpURL, nil
}

// watcher polls the phase database: every 25ms the deals won and not yet
// invoiced (the maximum-rate closers' backlog gate, the warm-up and the
// drain), and every 250ms a timeline sample with the lag and the queue
// depth.
//
// It counts the pending deals, not the invoiced ones: both contenders
// keep deals_status_idx, so the pending count reads the backlog's index
// entries, a few hundred at most, where counting the invoiced deals read
// every deal invoiced so far, 40 times a second. That observer cost ~0.1
// core of Postgres at maximum rate (pg_stat_statements: 2.2 ms a call near
// the end of a phase), CPU the ceiling phase, which has no watcher, never
// paid.
type watcher struct {
	pool     *pgxpool.Pool
	kind     string
	pending  atomic.Int64
	polled   atomic.Int64 // completed polls
	closed   func() int64
	start    time.Time
	mu       sync.Mutex
	samples  []Sample
	sampling atomic.Bool
}

const pendingSQL = `SELECT count(*) FROM deals WHERE status = 'won'`

func (w *watcher) run(ctx context.Context) {
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		var n int64
		if err := w.pool.QueryRow(ctx, pendingSQL).Scan(&n); err == nil {
			w.pending.Store(n)
			w.polled.Add(1)
		}
		if i%10 == 0 && w.sampling.Load() {
			s := Sample{T: time.Since(w.start).Seconds(), Pending: n, Closed: w.closed()}
			var age *float64
			var err error
			if w.kind == KindRiver {
				err = w.pool.QueryRow(ctx, `SELECT count(*), extract(epoch FROM now() - min(scheduled_at))::float8
					FROM river_job WHERE state = 'available'`).Scan(&s.Depth, &age)
			} else {
				var b outbox.Backlog
				if b, err = outbox.MeasureBacklog(ctx, w.pool); err == nil {
					a := b.OldestAge.Seconds()
					age = &a
					err = w.pool.QueryRow(ctx, `SELECT count(*) FROM work_queue`).Scan(&s.Depth)
				}
			}
			if err == nil {
				if age != nil {
					s.Lag = max(0, *age)
				}
				w.mu.Lock()
				w.samples = append(w.samples, s)
				w.mu.Unlock()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// waitDrained waits until every deal closed so far is invoiced (a poll
// that started after the call saw none pending), or d has passed. The
// closes counted must have returned before the call.
func (w *watcher) waitDrained(ctx context.Context, d time.Duration) bool {
	deadline := time.Now().Add(d)
	from := w.polled.Load() + 1 // a poll that may have started before the call does not count
	for w.polled.Load() <= from || w.pending.Load() > 0 {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

func (h *harness) runEndToEnd(ctx context.Context, p phase, db string) (_ *PhaseResult, err error) {
	children, erpURL, err := h.startContender(p, db)
	if err != nil {
		return nil, err
	}
	stopped := false
	stopAll := func() error {
		if stopped {
			return nil
		}
		stopped = true
		var errs []error
		// The ERP simulator last: the others may still be calling it.
		for i := len(children) - 1; i >= 0; i-- {
			if err := children[i].stop(); err != nil {
				errs = append(errs, err)
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("stopping the processes: %v", errs)
		}
		return nil
	}
	defer func() { _ = stopAll() }()

	pool, err := h.srv.newPool(ctx, db, "dealbridge-bench-load", int32(h.cfg.Closers+8))
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	ids, err := openDeals(ctx, pool)
	if err != nil {
		return nil, err
	}
	var opts []postgres.Option
	if p.kind == KindRiver {
		rc, err := newRiverInserter(pool)
		if err != nil {
			return nil, err
		}
		opts = append(opts, postgres.WithInvoicePublisher(riverPublisher(rc)))
	}
	store := postgres.NewStore(pool, opts...)
	if err := waitReady(ctx, pool, erpURL, children); err != nil {
		return nil, err
	}

	var closedSoFar atomic.Int64 // warm-up + window
	w := &watcher{pool: pool, kind: p.kind, closed: func() int64 { return closedSoFar.Load() }}
	wctx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan struct{})
	go func() { defer close(watchDone); w.run(wctx) }()
	defer func() { stopWatch(); <-watchDone }()

	// Warm-up: the processes connect their pools, and a few sagas run
	// end to end, before anything is measured.
	warmN := min(warmupDeals, len(ids))
	warm := closedLoop(ctx, store, ids[:warmN], h.cfg.Closers, time.Minute, nil, 0)
	ids = ids[warmN:]
	if warm.errors > 0 {
		return nil, fmt.Errorf("warm-up closes failed: %w", warm.firstErr)
	}
	if !w.waitDrained(ctx, 60*time.Second) {
		return nil, fmt.Errorf("the warm-up deals were not invoiced within 60s (logs in %s)", h.logDir)
	}
	base := int64(len(warm.closed))
	closedSoFar.Store(base)

	cpu0 := make([]time.Duration, len(children))
	for i, c := range children {
		cpu0[i] = c.cpu()
	}
	pg0, pgOK := h.srv.cpu()
	self0 := selfCPU()
	w.start = time.Now()
	w.sampling.Store(true)

	var out loadOut
	if p.rate == 0 {
		backlog := func(ok int64) int64 {
			closedSoFar.Store(base + ok)
			return w.pending.Load()
		}
		out = closedLoop(ctx, store, ids, h.cfg.Closers, h.cfg.Phase, backlog, int64(h.cfg.MaxBacklog))
	} else {
		out = openLoop(ctx, store, ids, p.rate, h.cfg.Phase)
	}
	closedSoFar.Store(base + int64(len(out.closed)))
	total := base + int64(len(out.closed))
	drainStart := time.Now()
	drained := w.waitDrained(ctx, h.cfg.Drain)
	end := time.Now()
	// One more sample at the end of the drain.
	time.Sleep(260 * time.Millisecond)
	w.sampling.Store(false)

	cpu1 := make([]time.Duration, len(children))
	for i, c := range children {
		cpu1[i] = c.cpu()
	}
	pg1, _ := h.srv.cpu()
	self1 := selfCPU()

	stats, statsErr := erpStats(erpURL)
	stopErr := stopAll()

	r := newResult(p, out)
	r.Drained = drained
	r.DrainSeconds = end.Sub(drainStart).Seconds()
	r.BusySeconds = end.Sub(out.start).Seconds()
	r.CPULoad = (self1 - self0).Seconds()
	r.CPUPostgres = -1
	if pgOK {
		r.CPUPostgres = (pg1 - pg0).Seconds()
	}
	for i, c := range children {
		ps := ProcStat{Name: c.name, CPUSeconds: (cpu1[i] - cpu0[i]).Seconds(), PeakRSS: c.peakRSS()}
		r.CPU = append(r.CPU, ps)
		if c.name == "erp-sim" {
			r.CPUERP += ps.CPUSeconds
		} else {
			r.CPUService += ps.CPUSeconds
		}
	}
	w.mu.Lock()
	r.Samples = w.samples
	w.mu.Unlock()
	r.LagKind = "relay lag"
	if p.kind == KindRiver {
		r.LagKind = "job lag"
	}
	var lagSum float64
	for _, s := range r.Samples {
		r.LagMax = max(r.LagMax, s.Lag)
		r.DepthMax = max(r.DepthMax, s.Depth)
		lagSum += s.Lag
	}
	if len(r.Samples) > 0 {
		r.LagMean = lagSum / float64(len(r.Samples))
	}
	warmSet := map[string]bool{}
	for _, id := range warm.closed {
		warmSet[domain.DealStream(id)] = true
	}
	if err := measureLatency(ctx, pool, r, warmSet, out); err != nil {
		return nil, err
	}
	if err := verify(ctx, pool, p.kind, r, int(total), stats, statsErr); err != nil {
		return nil, err
	}
	if stopErr != nil {
		r.Verify.Problems = append(r.Verify.Problems, stopErr.Error())
		r.Verify.OK = false
	}
	if !drained {
		r.Verify.Problems = append(r.Verify.Problems, fmt.Sprintf("not drained %s after the load", h.cfg.Drain))
		r.Verify.OK = false
	}
	return r, nil
}

// measureLatency reads, from the event log, when each deal of the window
// was won and when it was invoiced. recorded_at is now() of the writing
// transaction, i.e. its start: both ends are off by the length of a short
// transaction, in the same direction.
func measureLatency(ctx context.Context, pool *pgxpool.Pool, r *PhaseResult, warm map[string]bool, out loadOut) error {
	rows, err := pool.Query(ctx, `SELECT w.stream_id, extract(epoch FROM w.recorded_at)::float8, extract(epoch FROM i.recorded_at)::float8
		FROM events w LEFT JOIN events i ON i.stream_id = w.stream_id AND i.type = $2
		WHERE w.type = $1`, domain.TypeDealWon, domain.TypeInvoiceCreated)
	if err != nil {
		return fmt.Errorf("latency: %w", err)
	}
	defer rows.Close()
	var (
		ms                      []float64
		firstWon, lastInvoice   float64
		inWindow                int
		ws, we                  = float64(out.start.UnixMicro()) / 1e6, float64(out.end.UnixMicro()) / 1e6
		stream                  string
		won                     float64
		inv                     *float64
		windowDeals, notInvoice int
	)
	for rows.Next() {
		if err := rows.Scan(&stream, &won, &inv); err != nil {
			return fmt.Errorf("latency: %w", err)
		}
		if inv != nil && *inv >= ws && *inv <= we {
			inWindow++
		}
		if warm[stream] {
			continue
		}
		windowDeals++
		if firstWon == 0 || won < firstWon {
			firstWon = won
		}
		if inv == nil {
			notInvoice++
			continue
		}
		lastInvoice = max(lastInvoice, *inv)
		ms = append(ms, (*inv-won)*1000)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("latency: %w", err)
	}
	q := quantiles(ms)
	r.Latency = &q
	if we > ws {
		r.Sustained = float64(inWindow) / (we - ws)
	}
	if lastInvoice > firstWon && notInvoice == 0 {
		r.EndToEnd = float64(windowDeals) / (lastInvoice - firstWon)
	}
	return nil
}

func erpStats(erpURL string) (erpsim.Stats, error) {
	var s erpsim.Stats
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(erpURL + "/_sim/stats")
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("GET /_sim/stats: %s", resp.Status)
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

// verify checks that every successful close (warm-up included) was
// invoiced exactly once, and nothing else: in the event log, in the deals'
// projection, in the ERP's ledger, and that the queue is empty.
func verify(ctx context.Context, pool *pgxpool.Pool, kind string, r *PhaseResult, expected int, stats erpsim.Stats, statsErr error) error {
	v := &r.Verify
	v.Expected = expected
	var distinct int
	err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM events WHERE type = $1),
			(SELECT count(*) FROM events WHERE type = $2), (SELECT count(DISTINCT stream_id) FROM events WHERE type = $2),
			(SELECT count(*) FROM deals WHERE status = 'invoiced' AND invoice_number IS NOT NULL)`,
		domain.TypeDealWon, domain.TypeInvoiceCreated).Scan(&v.WonEvents, &v.InvoiceEvents, &distinct, &v.InvoicedDeals)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	if kind == KindRiver {
		var other int
		err = pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state <> 'completed'), count(*) FILTER (WHERE state = 'completed') FROM river_job`).
			Scan(&v.QueueLeft, &other)
		if err == nil && other != expected {
			v.Problems = append(v.Problems, fmt.Sprintf("%d river jobs completed, want %d", other, expected))
		}
	} else {
		err = pool.QueryRow(ctx, `SELECT count(*) FROM work_queue`).Scan(&v.QueueLeft)
	}
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	if statsErr != nil {
		v.Problems = append(v.Problems, "ERP ledger unavailable: "+statsErr.Error())
	} else {
		v.ERPCreates, v.ERPKeys, v.ERPMaxPerKey = stats.Creates, stats.Keys, stats.MaxCreatesPerKey
	}
	if r.CloseErrors > 0 {
		v.Problems = append(v.Problems, fmt.Sprintf("%d closes failed (first: %s)", r.CloseErrors, r.FirstError))
	}
	check := func(what string, got int) {
		if got != expected {
			v.Problems = append(v.Problems, fmt.Sprintf("%s: %d, want %d (the successful closes)", what, got, expected))
		}
	}
	check("DealWon events", v.WonEvents)
	check("InvoiceCreated events", v.InvoiceEvents)
	check("deals invoiced (distinct)", distinct)
	check("deals in status invoiced", v.InvoicedDeals)
	if statsErr == nil {
		check("ERP invoices created", v.ERPCreates)
		check("ERP keys invoiced", v.ERPKeys)
		if v.ERPMaxPerKey > 1 {
			v.Problems = append(v.Problems, fmt.Sprintf("the ERP holds %d invoices for one key", v.ERPMaxPerKey))
		}
	}
	if v.QueueLeft != 0 {
		v.Problems = append(v.Problems, fmt.Sprintf("%d messages left in the queue", v.QueueLeft))
	}
	v.OK = len(v.Problems) == 0
	return nil
}
