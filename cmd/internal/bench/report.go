package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Result is a whole run.
type Result struct {
	Started      time.Time         `json:"started"`
	Command      string            `json:"command"`
	Quick        bool              `json:"quick"`
	Machine      Machine           `json:"machine"`
	Config       map[string]string `json:"config"`
	SetupSeconds float64           `json:"setup_s"`
	TotalSeconds float64           `json:"total_s"`
	Phases       []*PhaseResult    `json:"phases"`
	Replay       *ReplayResult     `json:"replay,omitempty"`
	Bulk         *BulkResult       `json:"bulk_reinject,omitempty"`
	// Verified: every end-to-end phase invoiced every deal it closed
	// exactly once, and every ceiling phase wrote one outbox message per
	// close.
	Verified bool     `json:"verified"`
	Targets  []Target `json:"targets"`
}

// Machine describes where the run ran.
type Machine struct {
	CPUs       int               `json:"cpus"`
	CPUModel   string            `json:"cpu_model"`
	MemoryGiB  float64           `json:"memory_gib"`
	Kernel     string            `json:"kernel"`
	Postgres   string            `json:"postgres"`
	PGSettings map[string]string `json:"postgres_settings"`
	Go         string            `json:"go"`
	Revision   string            `json:"revision"`
	Embedded   bool              `json:"embedded_postgres"`
}

// Target is one of issue 9's targets and what the run measured.
type Target struct {
	What     string `json:"what"`
	Measured string `json:"measured"`
	Met      *bool  `json:"met,omitempty"` // nil: not measured in this run
}

func describeMachine(ctx context.Context, s *server) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), Embedded: s.cluster != nil, PGSettings: map[string]string{}}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	var si syscall.Sysinfo_t
	if syscall.Sysinfo(&si) == nil {
		m.MemoryGiB = float64(si.Totalram) * float64(si.Unit) / (1 << 30)
	}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		var b strings.Builder
		for _, c := range u.Release {
			if c == 0 {
				break
			}
			b.WriteByte(byte(c))
		}
		m.Kernel = b.String()
	}
	_ = s.admin.QueryRow(ctx, `SELECT version()`).Scan(&m.Postgres)
	rows, err := s.admin.Query(ctx, `SELECT name, setting || coalesce(unit, '') FROM pg_settings
		WHERE name IN ('shared_buffers','max_connections','fsync','synchronous_commit','wal_level','full_page_writes','max_wal_size','work_mem')`)
	if err == nil {
		for rows.Next() {
			var k, v string
			if rows.Scan(&k, &v) == nil {
				m.PGSettings[k] = v
			}
		}
		rows.Close()
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, st := range bi.Settings {
			switch st.Key {
			case "vcs.revision":
				m.Revision = st.Value
			case "vcs.modified":
				if st.Value == "true" {
					m.Revision += " (modified)"
				}
			}
		}
	}
	if m.Revision == "" {
		m.Revision = gitRevision(ctx)
	}
	return m
}

// gitRevision is the working directory's git revision, for a binary built
// without VCS stamping (go run, -buildvcs=false); "" when unknown.
func gitRevision(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return ""
	}
	rev := strings.TrimSpace(string(out))
	if exec.CommandContext(ctx, "git", "diff", "--quiet", "HEAD", "--").Run() != nil {
		rev += " (with uncommitted changes)"
	}
	return rev
}

func describeConfig(c Config) map[string]string {
	rates := make([]string, len(c.Rates))
	for i, r := range c.Rates {
		rates[i] = fmt.Sprint(r)
	}
	ints := func(v []int) string { return strings.Trim(strings.Join(strings.Fields(fmt.Sprint(v)), ","), "[]") }
	return map[string]string{
		"phase":           c.Phase.String(),
		"rounds":          strconv.Itoa(c.Rounds),
		"drain_max":       c.Drain.String(),
		"ceiling_clients": ints(c.CeilingClients),
		"closers":         fmt.Sprint(c.Closers),
		"max_backlog":     fmt.Sprint(c.MaxBacklog),
		"rates":           strings.Join(rates, ","),
		"handlers":        ints(c.Handlers),
		"batch_sizes":     ints(c.BatchSizes),
		"consumers":       fmt.Sprint(c.Consumers),
		"river_workers":   ints(c.RiverWorkers),
		"river_fetch":     fmt.Sprintf("cooldown %s, poll %s", durOr(c.RiverFetchCooldown, "100ms (default)"), durOr(c.RiverFetchPoll, "1s (default)")),
		"child_log_level": c.ChildLogLevel,
		"skus":            fmt.Sprint(c.SKUs),
		"pool_deals":      fmt.Sprint(c.PoolDeals),
		"replay_events":   fmt.Sprint(c.ReplayEvents),
		"bulk":            fmt.Sprintf("%d deals x %d", c.BulkDeals, c.BulkPerDeal),
		"relay_poll":      durOr(c.RelayPoll, "default"),
		"queue_poll":      durOr(c.QueuePoll, "default"),
	}
}

func durOr(d time.Duration, s string) string {
	if d == 0 {
		return s
	}
	return d.String()
}

// mainRuns returns the main comparison's phases of kind at rate (0:
// maximum rate), one per round.
func (r *Result) mainRuns(kind string, rate float64) []*PhaseResult {
	var out []*PhaseResult
	for _, p := range r.Phases {
		if p.Kind == kind && p.Group == GroupMain && p.Rate == rate {
			out = append(out, p)
		}
	}
	return out
}

// medianOf is the median of f over ps (the mean of the middle two for an
// even count), with every value in phase order for the report.
func medianOf(ps []*PhaseResult, f func(*PhaseResult) float64) (float64, string) {
	if len(ps) == 0 {
		return 0, ""
	}
	vs := make([]float64, 0, len(ps))
	strs := make([]string, 0, len(ps))
	for _, p := range ps {
		v := f(p)
		vs = append(vs, v)
		strs = append(strs, strconv.FormatFloat(v, 'f', 0, 64))
	}
	return median(vs), strings.Join(strs, ", ")
}

// ofRuns says what a median is made of: "" for a single run.
func ofRuns(n int, values string) string {
	if n < 2 {
		return ""
	}
	return fmt.Sprintf("; median of %d runs: %s", n, values)
}

// ceilingRatios are the per-round ratios of dealbridge's maximum rate to
// the ceiling: in round k, dealbridge's deals/s over the best, across
// client counts, of the mean of the ceiling runs that bracket it (rounds k
// and k+1). Each ratio compares measurements a minute apart, so the drift
// of the machine's speed between rounds cancels out.
func (r *Result) ceilingRatios(dbs []*PhaseResult) (ratios []float64, detail []string) {
	ceil := map[[2]int]float64{} // (clients, round) → tx/s
	var clients []int
	for _, p := range r.Phases {
		if p.Kind == KindCeiling {
			ceil[[2]int{p.Clients, p.Round}] = p.Sustained
			if !slices.Contains(clients, p.Clients) {
				clients = append(clients, p.Clients)
			}
		}
	}
	for _, db := range dbs {
		best, bestClients := 0.0, 0
		for _, c := range clients {
			before, okB := ceil[[2]int{c, db.Round}]
			after, okA := ceil[[2]int{c, db.Round + 1}]
			v := before
			switch {
			case okB && okA:
				v = (before + after) / 2
			case okA:
				v = after
			}
			if v > best {
				best, bestClients = v, c
			}
		}
		if best > 0 {
			ratios = append(ratios, db.Sustained/best)
			detail = append(detail, fmt.Sprintf("%.0f%% (%.0f / %.0f tx/s at %d clients)", 100*db.Sustained/best, db.Sustained, best, bestClients))
		}
	}
	return ratios, detail
}

// median of vs (the mean of the middle two for an even count).
func median(vs []float64) float64 {
	vs = slices.Sorted(slices.Values(vs))
	n := len(vs)
	if n == 0 {
		return 0
	}
	if n%2 == 0 {
		return (vs[n/2-1] + vs[n/2]) / 2
	}
	return vs[n/2]
}

func sustained(p *PhaseResult) float64 { return p.Sustained }

// perRound says what a median of per-round values is made of.
func perRound(detail []string) string {
	if len(detail) == 1 {
		return " " + strings.TrimPrefix(detail[0], strings.Fields(detail[0])[0]+" ")
	}
	return fmt.Sprintf(" (median of %d rounds: %s)", len(detail), strings.Join(detail, "; "))
}

// finish computes Verified and the targets.
func (r *Result) finish() {
	r.Verified = true
	for _, p := range r.Phases {
		if !p.Verify.OK {
			r.Verified = false
		}
	}
	met := func(b bool) *bool { return &b }
	dbs, rvs := r.mainRuns(KindDealbridge, 0), r.mainRuns(KindRiver, 0)
	dbMax, _ := medianOf(dbs, sustained)
	if len(dbs) > 0 && len(rvs) == len(dbs) {
		var ratios []float64
		var detail []string
		for i := range dbs {
			if rvs[i].Sustained > 0 {
				ratios = append(ratios, dbs[i].Sustained/rvs[i].Sustained)
				detail = append(detail, fmt.Sprintf("%.2f (%.0f / %.0f)", ratios[len(ratios)-1], dbs[i].Sustained, rvs[i].Sustained))
			}
		}
		if len(ratios) > 0 {
			ratio := median(ratios)
			r.Targets = append(r.Targets, Target{"sustained deals/s, dealbridge / River ≥ 1.0 (maximum rate)",
				fmt.Sprintf("%.2f%s", ratio, perRound(detail)), met(ratio >= 1)})
		}
	}
	if ratios, detail := r.ceilingRatios(dbs); len(ratios) > 0 {
		ratio := median(ratios)
		r.Targets = append(r.Targets, Target{"sustained deals/s ≥ 40% of the ceiling's tx/s",
			fmt.Sprintf("%.0f%%%s", 100*ratio, perRound(detail)), met(ratio >= 0.4)})
	}
	p99 := func(p *PhaseResult) float64 {
		if p.Latency == nil {
			return math.Inf(1)
		}
		return p.Latency.P99
	}
	if at500 := r.mainRuns(KindDealbridge, 500); len(at500) > 0 {
		v, values := medianOf(at500, p99)
		river := "not run"
		if rvs := r.mainRuns(KindRiver, 500); len(rvs) > 0 {
			rv, rvValues := medianOf(rvs, p99)
			river = fmt.Sprintf("%.1f ms%s", rv, ofRuns(len(rvs), rvValues))
		}
		r.Targets = append(r.Targets, Target{"p99 commit→invoice ≤ 50 ms at 500 deals/s",
			fmt.Sprintf("%.1f ms%s (River: %s)", v, ofRuns(len(at500), values), river), met(v <= 50)})
	} else {
		r.Targets = append(r.Targets, Target{"p99 commit→invoice ≤ 50 ms at 500 deals/s", "not run (no 500/s phase)", nil})
	}
	if len(dbs) > 0 {
		peak := map[string]int64{}
		var names []string
		for _, db := range dbs {
			for _, c := range db.CPU {
				if c.Name == "relay" || strings.HasPrefix(c.Name, "handler") {
					if _, ok := peak[c.Name]; !ok {
						names = append(names, c.Name)
					}
					peak[c.Name] = max(peak[c.Name], c.PeakRSS)
				}
			}
		}
		var parts []string
		ok := true
		for _, n := range names {
			parts = append(parts, fmt.Sprintf("%s %s", n, mib(peak[n])))
			ok = ok && peak[n] <= 100<<20
		}
		r.Targets = append(r.Targets, Target{"relay and handler peak RSS ≤ 100 MB each at maximum rate", strings.Join(parts, ", "), met(ok)})
	}
	var sc []string
	if len(dbs) > 0 {
		sc = append(sc, fmt.Sprintf("h%d/b%d %.0f", dbs[0].Handlers, dbs[0].BatchSize, dbMax))
	}
	for _, p := range r.Phases {
		if p.Kind == KindDealbridge && p.Rate == 0 && p.Group == GroupScaling {
			sc = append(sc, fmt.Sprintf("h%d/b%d %.0f", p.Handlers, p.BatchSize, p.Sustained))
		}
	}
	if len(sc) > 0 {
		r.Targets = append(r.Targets, Target{"scaling with handler processes and relay batch size: reported", strings.Join(sc, ", ") + " deals/s", met(true)})
	}
	if r.Replay != nil {
		r.Targets = append(r.Targets, Target{"replay rebuild ≥ 100,000 events/s",
			fmt.Sprintf("%.0f events/s (%d events; fastest of %s)", r.Replay.EventsPerSec, r.Replay.Events, runsOf(r.Replay.Runs)), met(r.Replay.EventsPerSec >= 100_000)})
	}
	if r.Bulk != nil {
		r.Targets = append(r.Targets, Target{"bulk dead-letter re-inject ≥ 2,000 entries/s",
			fmt.Sprintf("%.0f entries/s (%d entries)", r.Bulk.EntriesPerSec, r.Bulk.Entries), met(r.Bulk.EntriesPerSec >= 2000)})
	}
	r.Targets = append(r.Targets, Target{"every contender invoiced every deal it closed exactly once", yesNo(r.Verified), met(r.Verified)})
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "NO"
}

func mib(b int64) string {
	if b <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20))
}

// Write writes README.md, chart.svg and result.json into dir.
func (r *Result) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("bench: report dir: %w", err)
	}
	j, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("bench: result: %w", err)
	}
	files := map[string][]byte{
		"result.json": append(j, '\n'),
		"chart.svg":   []byte(r.SVG()),
		"README.md":   []byte(r.Markdown()),
	}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if err := os.WriteFile(filepath.Join(dir, name), files[name], 0o644); err != nil {
			return fmt.Errorf("bench: write %s: %w", name, err)
		}
	}
	return nil
}

func f0(v float64) string { return fmt.Sprintf("%.0f", v) }
func f1(v float64) string { return fmt.Sprintf("%.1f", v) }

// cores is CPU seconds per second of the phase.
func cores(cpu, busy float64) string {
	if cpu < 0 {
		return "n/a"
	}
	if busy <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", cpu/busy)
}

// perDeal is CPU µs per deal of the window.
func perDeal(cpu float64, n int) string {
	if cpu < 0 || n == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.0f", cpu*1e6/float64(n))
}

// Markdown renders the report.
func (r *Result) Markdown() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# dealbridge benchmark\n\n")
	if r.Quick {
		w("> **Quick mode**: a smoke run of a few seconds per phase. Its numbers say nothing about speed.\n\n")
	}
	w("Reproduce: `%s`\n\n", r.Command)
	m := r.Machine
	w("Run %s, %.0f s in all (%.0f s preparing the template). Machine: %d × %s, %.0f GiB, Linux %s; %s",
		r.Started.UTC().Format("2006-01-02 15:04 UTC"), r.TotalSeconds, r.SetupSeconds, m.CPUs, m.CPUModel, m.MemoryGiB, m.Kernel, firstWords(m.Postgres, 2))
	if m.Embedded {
		w(" (a private cluster started by the bench)")
	}
	w("; %s; dealbridge %s.\n", m.Go, cmpOr(m.Revision, "unknown revision"))
	keys := slices.Sorted(maps.Keys(m.PGSettings))
	var kv []string
	for _, k := range keys {
		kv = append(kv, k+"="+m.PGSettings[k])
	}
	w("Postgres settings: %s.\n\n", strings.Join(kv, ", "))
	if !r.Verified {
		w("**A contender failed the exactly-once check: see [Exactly once](#exactly-once).**\n\n")
	}

	w("## Targets (issue 9)\n\n| target | measured | met |\n|---|---|---|\n")
	for _, t := range r.Targets {
		ok := "–"
		if t.Met != nil {
			ok = map[bool]string{true: "yes", false: "**no**"}[*t.Met]
		}
		w("| %s | %s | %s |\n", t.What, t.Measured, ok)
	}
	w("\n![throughput and latency](chart.svg)\n\n")

	w("## Ceiling: the close transaction alone\n\n")
	w("`postgres.Store.CloseDeal` (deal row and inventory rows locked in SKU order, allocation checked, events appended with their hash chain, projections, outbox message, the deal's view read back, commit with the relays' wake-up: four round trips), closed loop, no relay or handler running.\n\n")
	w("| clients | closes | tx/s | close p50 ms | p99 ms | CPU Postgres (cores) | CPU client (cores) | Postgres µs/tx |\n|---|---|---|---|---|---|---|---|\n")
	for _, p := range r.Phases {
		if p.Kind != KindCeiling {
			continue
		}
		clients := strconv.Itoa(p.Clients)
		if p.Round > 0 {
			clients += fmt.Sprintf(" (run %d)", p.Round)
		}
		w("| %s | %d%s | **%s** | %s | %s | %s | %s | %s |\n", clients, p.Closed, exhaustedMark(p), f0(p.Sustained), f1(p.CloseLatency.P50), f1(p.CloseLatency.P99),
			cores(p.CPUPostgres, p.BusySeconds), cores(p.CPULoad, p.BusySeconds), perDeal(p.CPUPostgres, p.Closed))
	}

	w("\n## End to end: dealbridge and River side by side\n\n")
	e2eTable(&b, r.Phases, func(p *PhaseResult) bool { return p.Kind != KindCeiling && p.Group == GroupMain })
	w("\n## Scaling at maximum rate: dealbridge's handler processes and relay batch size, River's MaxWorkers\n\n")
	e2eTable(&b, r.Phases, func(p *PhaseResult) bool {
		return p.Kind != KindCeiling && p.Rate == 0
	})

	w("\n## Processes: CPU and peak RSS\n\n| phase | process | CPU s | CPU (cores) | peak RSS |\n|---|---|---|---|---|\n")
	for _, p := range r.Phases {
		for _, c := range p.CPU {
			w("| %s | %s | %.2f | %s | %s |\n", p.Name, c.Name, c.CPUSeconds, cores(c.CPUSeconds, p.BusySeconds), mib(c.PeakRSS))
		}
	}

	if r.Replay != nil || r.Bulk != nil {
		w("\n## Replay and bulk re-inject\n\n| operation | size | time | rate | CPU bench (s) | CPU Postgres (s) |\n|---|---|---|---|---|---|\n")
		if x := r.Replay; x != nil {
			w("| replay rebuild of every projection (`projections.Replay`, 2 writers), fastest of %d runs (%s events/s) | %d events | %.2f s | **%.0f events/s** | %.2f | %s |\n",
				len(x.Runs), runsOf(x.Runs), x.Events, x.Seconds, x.EventsPerSec, x.CPULoad, cpuOrNA(x.CPUPostgres))
		}
		if x := r.Bulk; x != nil {
			w("| bulk dead-letter re-inject (`Store.RunBulkReinject`, unlimited rate) | %d entries over %d deals | %.2f s | **%.0f entries/s** | %.2f | %s |\n",
				x.Entries, x.Deals, x.Seconds, x.EntriesPerSec, x.CPULoad, cpuOrNA(x.CPUPostgres))
		}
	}

	w("\n## Exactly once\n\nAfter each phase's drain: DealWon events, InvoiceCreated events, distinct invoiced deals, deals in status `invoiced`, the ERP simulator's creates and distinct keys must all equal the closes the generator saw succeed (warm-up included), no key may hold two ERP invoices, and the queue (work_queue, or River jobs not completed) must be empty.\n\n")
	w("| phase | closes | DealWon | InvoiceCreated | invoiced | ERP creates | ERP keys | max per key | queue left | ok |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range r.Phases {
		v := p.Verify
		if p.Kind == KindCeiling {
			w("| %s | %d | %d | (outbox %d) | – | – | – | – | – | %s |\n", p.Name, v.Expected, v.WonEvents, v.OutboxMessages, okMark(v))
			continue
		}
		w("| %s | %d | %d | %d | %d | %d | %d | %d | %d | %s |\n", p.Name, v.Expected, v.WonEvents, v.InvoiceEvents, v.InvoicedDeals,
			v.ERPCreates, v.ERPKeys, v.ERPMaxPerKey, v.QueueLeft, okMark(v))
	}
	for _, p := range r.Phases {
		for _, pr := range p.Verify.Problems {
			w("\n- %s: %s", p.Name, pr)
		}
	}

	w("\n\n## How it is measured\n\n")
	w(method, r.Config["rounds"], r.Config["phase"], r.Config["closers"], r.Config["max_backlog"], r.Config["consumers"], r.Config["river_workers"], r.Config["river_fetch"], r.Config["child_log_level"], r.Config["skus"], r.Config["pool_deals"])
	return b.String()
}

const method = `* **One run, one server, interleaved.** Every phase runs in a fresh database copied from one template (dealbridge's and River's migrations, the stocked SKUs and a pool of open deals, vacuumed), on the same PostgreSQL server, one phase after the other. The main comparison runs in %s rounds: in each, the ceilings, then dealbridge and River at maximum rate and at each fixed rate, the two taking turns to go first (ABBA across rates and rounds); the ceilings run once more after the last round, so that every maximum-rate pair is bracketed by ceiling runs. This machine's speed drifts by up to a third from one minute to the next, and a single run measures the drift as much as the code, so the targets are medians over the rounds of paired measurements: dealbridge / River of the same round; dealbridge over the ceiling runs just before and after it (their mean, at the best client count); the p99 at 500 deals/s of each round. Every run is in the tables. Then dealbridge's scaling phases, once each. The load of each phase lasts %s; a phase that used up the pool of open deals ends early and is marked †.
* **Processes.** The relay, the handlers, the ERP simulator and the River worker are child processes of this binary (` + "`relay`, `handler`, `erp-sim`, `bench river-worker`" + `), started fresh for each phase, with their flags' defaults except the batch size and handler count of the phase. The load generator runs in the bench process and calls ` + "`postgres.Store.CloseDeal`" + ` directly (no HTTP API in the path). Before each measurement, 40 deals go through end to end (warm-up, not counted).
* **Maximum rate** is closed loop: %s clients close deals as fast as they can, but wait while more than %s deals are closed and not yet invoiced, so that input equals output and the rate is one the pipeline sustains. **Fixed rates** are open loop: closes start on a fixed schedule whatever the system's speed (‡ marks a generator that fell behind its schedule).
* **Sustained deals/s** is the number of invoices recorded during the load window divided by the window (for the ceiling: committed closes per second). **end to end/s** is the window's deals divided by the time from the first one's close to the last one's invoice, drain included.
* **Commit→invoice latency** comes from the event log: ` + "`recorded_at`" + ` of the deal's DealWon event (written by the close transaction) to ` + "`recorded_at`" + ` of its InvoiceCreated event (written by the handler's or River worker's recording transaction). ` + "`recorded_at`" + ` is ` + "`now()`" + `, the start of its transaction, so each end is early by the length of one short transaction, in the same direction. Every deal of the window counts.
* **The observer** (both contenders alike; the ceiling has none) counts the deals won and not yet invoiced every 25 ms, for the gate, the warm-up and the drain: an index range over the backlog (` + "`deals_status_idx`" + `), not a count of every invoiced deal.
* **Lag** is sampled every 250 ms from the window's start to the end of the drain: for dealbridge the relay lag (age of the oldest outbox row the relay has not passed, ` + "`outbox.MeasureBacklog`" + `), for River the age of the oldest available job. Queue depth: work_queue rows, or available River jobs.
* **CPU** is the utime+stime delta over the window and the drain (/proc/<pid>/stat): the service processes (relay + handlers, or the River worker), the ERP simulator, PostgreSQL (the postmaster and all its children, live ones from /proc and exited ones through the postmaster's cutime/cstime), and the load generator (the bench process, getrusage). "cores" is CPU seconds per second; "µs/deal" divides by the window's deals. **Peak RSS** is each child's ru_maxrss, as wait4 reports it.
* **Same work for both contenders.** Each handler runs %s consumers; the River worker runs River's default queue with MaxWorkers %s (the first is River's main configuration: River's documentation sizes MaxWorkers around 100, and with as few workers as one handler's consumers River fetches at most MaxWorkers jobs per FetchCooldown), FetchCooldown and FetchPollInterval %s, and River's defaults otherwise (LISTEN/NOTIFY wake-ups, its batching completer). Both call the ERP simulator through adapters/erp's HTTP client with the same idempotency key K, and both record the invoice with the same code (` + "`Store.RecordInvoice` / `Store.RecordInvoiceTx`" + `); River completes the job in that transaction (` + "`river.JobCompleteTx`" + `). Children log at level %s. Deals have 1-3 lines over %s SKUs (no hot row); the template holds %s open deals.
* **Not asserted anywhere.** Tests run this command in --quick mode and check only that the report is written and that every deal was invoiced exactly once.
`

func e2eTable(b *strings.Builder, ps []*PhaseResult, match func(*PhaseResult) bool) {
	fmt.Fprint(b, "| contender | config | offered | closed | sustained/s | end to end/s | p50 ms | p90 ms | p99 ms | max ms | lag max / mean s | depth max | CPU svc / ERP / PG / gen (cores) | svc + PG µs/deal |\n")
	fmt.Fprint(b, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range ps {
		if !match(p) {
			continue
		}
		cfg := fmt.Sprintf("1 worker process, MaxWorkers %d", p.Workers)
		if p.Kind == KindDealbridge {
			cfg = fmt.Sprintf("%d handler(s), batch %d", p.Handlers, p.BatchSize)
		}
		if p.Round > 0 {
			cfg += fmt.Sprintf(", round %d", p.Round)
		}
		offered := "max"
		if p.Rate > 0 {
			offered = f0(p.Rate) + "/s"
		}
		lat := Quantiles{}
		if p.Latency != nil {
			lat = *p.Latency
		}
		svcPG := p.CPUService + p.CPUPostgres
		if p.CPUPostgres < 0 {
			svcPG = -1
		}
		fmt.Fprintf(b, "| %s | %s | %s | %d%s | **%s** | %s | %s | %s | %s | %s | %s / %s | %d | %s / %s / %s / %s | %s |\n",
			p.Kind, cfg, offered, p.Closed, exhaustedMark(p), f0(p.Sustained), f0(p.EndToEnd), f1(lat.P50), f1(lat.P90), f1(lat.P99), f1(lat.Max),
			fmt.Sprintf("%.2f", p.LagMax), fmt.Sprintf("%.2f", p.LagMean), p.DepthMax,
			cores(p.CPUService, p.BusySeconds), cores(p.CPUERP, p.BusySeconds), cores(p.CPUPostgres, p.BusySeconds), cores(p.CPULoad, p.BusySeconds),
			perDeal(svcPG, p.Closed))
	}
}

func exhaustedMark(p *PhaseResult) string {
	s := ""
	if p.PoolExhausted {
		s += " †"
	}
	if p.Behind {
		s += " ‡"
	}
	return s
}

func okMark(v Verify) string {
	if v.OK {
		return "yes"
	}
	return "**NO**"
}

func cpuOrNA(v float64) string {
	if v < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", v)
}

func firstWords(s string, n int) string {
	f := strings.Fields(s)
	return strings.Join(f[:min(n, len(f))], " ")
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// runsOf lists the events/s of the replay's runs.
func runsOf(runs []float64) string {
	out := make([]string, len(runs))
	for i, v := range runs {
		out[i] = fmt.Sprintf("%.0f", v)
	}
	return strings.Join(out, ", ")
}
