// Package chaos proves dealbridge's "zero data loss" claim with figures: it
// drives N deals through the real processes (api, relay, several handlers,
// erp-sim — OS processes of the dealbridge binary) on a private Postgres
// cluster, injects the faults of the fault matrix (reliability.md §2:
// SIGKILLs at crash points and at random times, Postgres crashes and
// terminated connections, ERP errors, hangs and lost responses, latency and
// partitions through toxiproxy, duplicate deliveries, concurrent closes,
// double re-injects, a pinned xmin horizon, out-of-order commits, lost
// NOTIFYs), lets the system drain, and then classifies every deal with a
// checker that is independent of the service's own bookkeeping: it reads the
// generator's history, the service database and the ERP's ledger (see
// check.go). A report (markdown + SVG timeline) records the seed and the
// fault schedule so that a run can be reproduced.
//
// The positive control runs the same checker against a deliberately naive
// relay (id > last_id, naive.go) and must report loss.
package chaos

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgcluster"
)

// Relay modes.
const (
	RelayXID8  = "xid8"  // the real `dealbridge relay` process (watermill-sql, xid8 + snapshot xmin)
	RelayNaive = "naive" // the positive control: id > last_id, in this process
)

// Config configures a run. Zero values take defaults.
type Config struct {
	// Deals is the number of deals driven through the system. Default 500.
	Deals int
	// Seed seeds every random choice of the run (deal plan and fault
	// schedule). Default 1.
	Seed int64
	// Bin is the dealbridge binary to run as api, relay, handler, erp-sim.
	Bin string
	// WorkDir holds the cluster, the ERP store and the process logs.
	// Default: a new temporary directory, removed afterwards unless
	// KeepWorkDir.
	WorkDir     string
	KeepWorkDir bool
	// OutDir receives the report (report.md, timeline.svg, schedule.json,
	// result.json); empty: no files.
	OutDir string
	// Relay is RelayXID8 (default) or RelayNaive.
	Relay string
	// Load is how long the deals are spread over (and the faults
	// scheduled in). Default max(60s, Deals/40 per second).
	Load time.Duration
	// Drain bounds the wait for every saga to end after the load. Default
	// 3 minutes.
	Drain time.Duration
	// Quiet ends the drain early when nothing has moved for this long and
	// nothing is queued. Default 20s.
	Quiet time.Duration
	// Kinds are the enabled fault kinds; nil: all.
	Kinds []Kind
	// Handlers is the number of handler processes. Default 2.
	Handlers int
	// Concurrency is the number of deals in flight at once. Default 16.
	Concurrency int
	// SlowFraction is the fraction of deals closed by slow producers
	// (F17); default 0.1 when SlowCommit is enabled.
	SlowFraction float64
	// Title names the run in its report.
	Title string
	// Log receives progress lines. Default: discard.
	Log io.Writer
}

func (c *Config) defaults() error {
	c.Deals = cmp.Or(c.Deals, 500)
	c.Seed = cmp.Or(c.Seed, 1)
	c.Relay = cmp.Or(c.Relay, RelayXID8)
	if c.Relay != RelayXID8 && c.Relay != RelayNaive {
		return fmt.Errorf("chaos: relay %q: want %s or %s", c.Relay, RelayXID8, RelayNaive)
	}
	if c.Load == 0 {
		c.Load = max(60*time.Second, time.Duration(float64(c.Deals)/40*float64(time.Second)))
	}
	c.Drain = cmp.Or(c.Drain, 3*time.Minute)
	c.Quiet = cmp.Or(c.Quiet, 20*time.Second)
	if c.Kinds == nil {
		c.Kinds = AllKinds()
	}
	c.Handlers = cmp.Or(c.Handlers, 2)
	c.Concurrency = cmp.Or(c.Concurrency, 16)
	if c.SlowFraction == 0 && c.enabled(SlowCommit) {
		c.SlowFraction = 0.1
	}
	if c.Bin == "" {
		return errors.New("chaos: Config.Bin (the dealbridge binary) is required")
	}
	if c.Log == nil {
		c.Log = io.Discard
	}
	c.Title = cmp.Or(c.Title, fmt.Sprintf("chaos run: %d deals, seed %d, relay %s", c.Deals, c.Seed, c.Relay))
	return nil
}

func (c *Config) enabled(k Kind) bool {
	for _, x := range c.Kinds {
		if x == k {
			if c.Relay == RelayNaive && infoOf(k).relay {
				return false
			}
			return true
		}
	}
	return false
}

// run is one chaos run in progress.
type run struct {
	cfg     Config
	start   time.Time
	workDir string

	cluster   *pgcluster.Cluster
	directURL string // the harness's own connections
	proxyURL  string // the service's connections, through toxiproxy
	db        *pgxpool.Pool
	store     *postgres.Store // the harness's store (re-injects, poison)
	slowStore *postgres.Store // F17 producers
	pgMu      sync.Mutex      // one Postgres-wide fault at a time

	toxi     *toxiproxy.ApiServer
	pgProxy  *toxiproxy.Proxy
	erpProxy *toxiproxy.Proxy
	erpURL   string // direct
	apiURL   string
	plan     *erpPlan
	procs    map[string]*proc
	handlers []*proc
	naive    *naiveRelay
	http     *http.Client

	seq       atomic.Int64
	loadStart time.Time

	mu         sync.Mutex
	windows    []Window
	armed      map[string]int
	hist       *history
	reinjects  []reinjectRecord
	poisonIDs  []string
	malformed  []int // API status codes of malformed requests
	fixedAt    float64
	fixIDs     []string // customers rejected until the fix
	samples    []Sample
	plans      []dealPlan
	sched      []Fault
	loadEnd    float64
	drainEnd   float64
	drainTimed bool
}

func (r *run) logf(format string, args ...any) {
	fmt.Fprintf(r.cfg.Log, "%7.1fs "+format+"\n", append([]any{r.since()}, args...)...)
}

func (r *run) since() float64 { return time.Since(r.start).Seconds() }

func (r *run) handler(i int) *proc { return r.handlers[i%len(r.handlers)] }

func (r *run) arm(point string) {
	r.mu.Lock()
	r.armed[point]++
	r.mu.Unlock()
}

// Run performs a chaos run and returns its report. An error means the run
// could not be carried out; a run that found violations returns a report
// whose Pass is false.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	r := &run{cfg: cfg, start: time.Now(), procs: map[string]*proc{}, armed: map[string]int{},
		http: &http.Client{Timeout: 5 * time.Second}, hist: &history{}}
	sp := schedulePlan(cfg)
	r.plans, r.sched = sp.plans, sp.sched

	var err error
	r.workDir = cfg.WorkDir
	if r.workDir == "" {
		if r.workDir, err = os.MkdirTemp("", "dealbridge-chaos-"); err != nil {
			return nil, err
		}
		if !cfg.KeepWorkDir {
			defer os.RemoveAll(r.workDir)
		}
	}
	// The cluster runs as user postgres when we are root: it must be able
	// to reach its directory.
	_ = os.Chmod(r.workDir, 0o755)
	if err := r.setup(ctx); err != nil {
		r.teardown()
		return nil, err
	}
	rep, err := r.execute(ctx)
	r.teardown()
	if err != nil {
		return nil, err
	}
	rep.WorkDir = r.workDir
	if cfg.OutDir != "" {
		if err := rep.Write(cfg.OutDir); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

type plan struct {
	plans []dealPlan
	sched []Fault
}

// schedulePlan draws the deal plan and the fault schedule from cfg.Seed.
func schedulePlan(cfg Config) plan {
	rng := rand.New(rand.NewPCG(uint64(cfg.Seed), 0x6368616f73)) // "chaos"
	var p plan
	p.plans = planDeals(rng, &cfg)
	var kinds []Kind
	for _, k := range cfg.Kinds {
		if cfg.enabled(k) {
			kinds = append(kinds, k)
		}
	}
	p.sched = schedule(rng, kinds, cfg.Load, cfg.Handlers)
	return p
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func (r *run) setup(ctx context.Context) error {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	r.logf("starting a private Postgres cluster in %s", r.workDir)
	var err error
	r.cluster, err = pgcluster.Start(ctx, pgcluster.Config{
		DataDir: filepath.Join(r.workDir, "pg"),
		Settings: map[string]string{"fsync": "off", "full_page_writes": "off", "max_connections": "300",
			"synchronous_commit": "on"},
		Logger: quiet,
	})
	if err != nil {
		return fmt.Errorf("chaos needs the PostgreSQL server binaries: %w", err)
	}
	if err := r.cluster.EnsureDatabase(ctx, "dealbridge"); err != nil {
		return err
	}
	r.directURL = r.cluster.URL("dealbridge")
	if out, err := runOnce(ctx, r.cfg.Bin, []string{"DATABASE_URL=" + r.directURL}, 2*time.Minute, "migrate", "up"); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	pcfg, err := pgxpool.ParseConfig(r.directURL)
	if err != nil {
		return err
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = "chaos-harness"
	pcfg.MaxConns = 24
	if r.db, err = pgxpool.NewWithConfig(ctx, pcfg); err != nil {
		return err
	}
	r.store = postgres.NewStore(r.db)
	r.slowStore = postgres.NewStore(r.db, postgres.WithBeforeCommit(slowCommit))

	// toxiproxy, as a library, in front of Postgres and the ERP.
	r.toxi = toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	r.pgProxy = toxiproxy.NewProxy(r.toxi, "postgres", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(r.cluster.Port()))
	if err := r.pgProxy.Start(); err != nil {
		return err
	}
	r.proxyURL = fmt.Sprintf("postgres://%s@%s/dealbridge?sslmode=disable", pgcluster.Superuser, r.pgProxy.Listen)
	erpAddr, err := freeAddr()
	if err != nil {
		return err
	}
	r.erpURL = "http://" + erpAddr
	r.erpProxy = toxiproxy.NewProxy(r.toxi, "erp", "127.0.0.1:0", erpAddr)
	if err := r.erpProxy.Start(); err != nil {
		return err
	}
	apiAddr, err := freeAddr()
	if err != nil {
		return err
	}
	r.apiURL = "http://" + apiAddr

	var fix []string
	for _, p := range r.plans {
		if p.Fix {
			fix = append(fix, p.Customer)
		}
	}
	r.fixIDs = fix
	r.plan = &erpPlan{url: r.erpURL, client: &http.Client{Timeout: 2 * time.Second}, active: map[Kind]int{},
		reject: append([]string{rejectCustomer}, fix...)}

	logs := filepath.Join(r.workDir, "logs")
	if err := os.MkdirAll(logs, 0o755); err != nil {
		return err
	}
	add := func(name string, env []string, args ...string) *proc {
		p := newProc(name, r.cfg.Bin, filepath.Join(logs, name+".log"), env, r.logf, args...)
		r.procs[name] = p
		return p
	}
	db := []string{"DATABASE_URL=" + r.proxyURL}
	sim := add("erp-sim", nil, "erp-sim", "--listen", erpAddr, "--store", filepath.Join(r.workDir, "erp.jsonl"),
		"--seed", strconv.FormatInt(r.cfg.Seed, 10), "--reject-customer", rejectCustomer)
	sim.onStart = func() {
		if err := r.waitHealthy(ctx, r.erpURL, 30*time.Second); err == nil {
			_ = r.plan.apply()
		}
	}
	add("api", db, "api", "--listen", apiAddr)
	if r.cfg.Relay == RelayXID8 {
		add("relay", db, "relay", "--relay-poll-interval", "50ms")
	}
	for i := range r.cfg.Handlers {
		h := add(fmt.Sprintf("handler-%d", i+1), db, "handler", "--erp-url", "http://"+r.erpProxy.Listen,
			"--erp-timeout", "1s", "--consumers", "8", "--queue-poll-interval", "200ms", "--lease", "5s",
			"--nack-delay", "200ms", "--max-attempts", "8", "--retry-initial", "100ms", "--retry-max", "2s",
			"--breaker-failures", "20", "--breaker-cooldown", "500ms")
		r.handlers = append(r.handlers, h)
	}
	for _, p := range r.procs {
		go p.supervise()
	}
	if r.cfg.Relay == RelayNaive {
		r.naive = newNaiveRelay(r.directURL)
		r.naive.start(ctx)
	}
	if err := r.waitHealthy(ctx, r.erpURL, 60*time.Second); err != nil {
		return fmt.Errorf("erp-sim: %w", err)
	}
	if err := r.waitHealthy(ctx, r.apiURL, 60*time.Second); err != nil {
		return fmt.Errorf("api: %w", err)
	}
	if err := r.plan.apply(); err != nil {
		return err
	}
	for _, sku := range skus {
		if err := r.setInventory(ctx, sku); err != nil {
			return err
		}
	}
	r.logf("up: api %s, erp %s (proxy %s), postgres %s (proxy %s), %d handlers, relay %s",
		r.apiURL, r.erpURL, r.erpProxy.Listen, r.directURL, r.pgProxy.Listen, r.cfg.Handlers, r.cfg.Relay)
	return nil
}

func (r *run) waitHealthy(ctx context.Context, base string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		resp, err := r.http.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("healthz: %s", resp.Status)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *run) teardown() {
	var wg sync.WaitGroup
	for _, p := range r.procs {
		wg.Go(func() { p.stop(20 * time.Second) })
	}
	wg.Wait()
	if r.naive != nil {
		r.naive.stop()
	}
	if r.pgProxy != nil {
		r.pgProxy.Stop()
	}
	if r.erpProxy != nil {
		r.erpProxy.Stop()
	}
	if r.db != nil {
		r.db.Close()
	}
	if r.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_ = r.cluster.Stop(ctx, pgcluster.StopImmediate)
		cancel()
	}
}

// execute runs load + faults, heals, drains and checks.
func (r *run) execute(ctx context.Context) (*Report, error) {
	sctx, stopSampler := context.WithCancel(ctx)
	var swg sync.WaitGroup
	swg.Go(func() { r.sample(sctx) })

	r.loadStart = time.Now()
	r.logf("load: %d deals over %v, %d scheduled faults", len(r.plans), r.cfg.Load, len(r.sched))
	var wg sync.WaitGroup
	wg.Go(func() { r.nemesis(ctx, r.sched) })
	wg.Go(func() { r.generate(ctx) })
	wg.Wait()
	if ctx.Err() != nil {
		stopSampler()
		return nil, ctx.Err()
	}
	// Heal: every window has ended; the ERP accepts every customer but
	// C-REJECT; dead letters of fixable customers are re-injected.
	if r.cfg.enabled(DoubleReinject) {
		if _, err := r.fixAndReinject(ctx); err != nil {
			r.logf("final re-inject pass: %v", err)
		}
	}
	r.mu.Lock()
	r.loadEnd = r.since()
	r.mu.Unlock()
	r.logf("load done; healed; draining (at most %v)", r.cfg.Drain)
	r.drain(ctx)
	stopSampler()
	swg.Wait()
	r.logf("drained in %.1fs (timed out: %v); checking", r.drainEnd-r.loadEnd, r.drainTimed)
	// The final re-inject pass may have raced the drain's start: one more
	// pass for dead letters that appeared meanwhile is not needed, since no
	// customer is rejected any more except C-REJECT, which stays rejected.
	res, err := r.check(ctx)
	if err != nil {
		return nil, err
	}
	return r.report(res), nil
}

// PositiveControl turns cfg into the positive control: the naive relay
// (id > last_id) under out-of-order commits only (F17, half the deals
// closed by slow producers). The checker must report loss.
func PositiveControl(cfg Config) Config {
	cfg.Relay = RelayNaive
	cfg.Kinds = []Kind{SlowCommit}
	cfg.SlowFraction = 0.5
	cfg.Quiet = cmp.Or(cfg.Quiet, 10*time.Second)
	if cfg.Title == "" {
		cfg.Title = fmt.Sprintf("positive control: naive relay (id > last_id) under out-of-order commits, %d deals, seed %d", cmp.Or(cfg.Deals, 500), cmp.Or(cfg.Seed, 1))
	}
	return cfg
}

// Summary is the report's one-line result.
func (r *Report) Summary() string {
	c := r.Check
	total := 0
	for _, n := range r.Injected {
		total += n
	}
	v := "PASS"
	if !r.PassOK {
		v = "FAIL"
	}
	return fmt.Sprintf("%s: N = %d deals under %d injected faults (%d kinds): invoiced %d, recovered %d, re-injected+invoiced %d, compensated %d; "+
		"lost %d, duplicated %d, both %d, stuck %d, unexpected %d, inconsistent %d; drain %.1fs; %.2f ERP attempts per invoice",
		v, r.Deals, total, len(r.Injected), c.Counts[VInvoiced], c.Counts[VRecovered], c.Counts[VReinjected], c.Counts[VCompensated],
		c.Counts[VLost], c.Counts[VDuplicated], c.Counts[VBoth], c.Counts[VStuck], c.Counts[VUnexpected], c.Counts[VInconsistent],
		r.DrainTime, r.AttemptsPer)
}
