package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"
)

// Report is a run's result.
type Report struct {
	Title       string         `json:"title"`
	Seed        int64          `json:"seed"`
	Deals       int            `json:"deals"`
	Relay       string         `json:"relay"`
	Handlers    int            `json:"handlers"`
	Load        float64        `json:"load_seconds"`
	LoadEnd     float64        `json:"load_end"`
	DrainEnd    float64        `json:"drain_end"`
	DrainTime   float64        `json:"drain_seconds"`
	DrainTimed  bool           `json:"drain_timed_out"`
	Total       float64        `json:"total_seconds"`
	Versions    string         `json:"versions"`
	Command     string         `json:"command"`
	Schedule    []Fault        `json:"schedule"`
	Windows     []Window       `json:"windows"`
	Injected    map[Kind]int   `json:"injected"`
	Armed       map[string]int `json:"crashpoints_armed"`
	Check       *CheckResult   `json:"check"`
	Samples     []Sample       `json:"samples"`
	Reinjects   []reinjectRecord
	PerKind     []KindRow `json:"per_kind"`
	PassOK      bool      `json:"pass"`
	WorkDir     string    `json:"-"`
	AttemptsPer float64   `json:"erp_attempts_per_invoice"`
	LatP50      float64   `json:"close_to_terminal_p50"`
	LatP99      float64   `json:"close_to_terminal_p99"`
	LatMax      float64   `json:"close_to_terminal_max"`
}

// KindRow is one line of the per-fault-class table.
type KindRow struct {
	Kind       Kind    `json:"kind"`
	F          string  `json:"f"`
	What       string  `json:"what"`
	Injected   int     `json:"injected"`
	Affected   int     `json:"deals_affected"`
	Violations int     `json:"violations"`
	Recovered  int     `json:"recovered"`
	Comp       int     `json:"compensated"`
	P50        float64 `json:"close_to_terminal_p50"`
	P99        float64 `json:"close_to_terminal_p99"`
	Max        float64 `json:"close_to_terminal_max"`
}

// Pass reports whether the run found no violation.
func (r *Report) Pass() bool { return r.PassOK }

func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return -1 // none (JSON has no NaN)
	}
	s := slices.Clone(xs)
	sort.Float64s(s)
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func (r *run) report(res *CheckResult) *Report {
	r.mu.Lock()
	defer r.mu.Unlock()
	rep := &Report{Title: r.cfg.Title, Seed: r.cfg.Seed, Deals: r.cfg.Deals, Relay: r.cfg.Relay, Handlers: r.cfg.Handlers,
		Load: r.cfg.Load.Seconds(), LoadEnd: r.loadEnd, DrainEnd: r.drainEnd, DrainTime: r.drainEnd - r.loadEnd, DrainTimed: r.drainTimed,
		Total: r.since(), Schedule: r.sched, Windows: slices.Clone(r.windows), Injected: map[Kind]int{}, Armed: map[string]int{},
		Check: res, Samples: slices.Clone(r.samples), Reinjects: slices.Clone(r.reinjects)}
	for k, v := range r.armed {
		rep.Armed[k] = v
	}
	var pgv string
	_ = r.db.QueryRow(context.Background(), `SHOW server_version`).Scan(&pgv)
	rep.Versions = fmt.Sprintf("%s, PostgreSQL %s, %s/%s, %d CPUs", runtime.Version(), pgv, runtime.GOOS, runtime.GOARCH, runtime.NumCPU())
	rep.Command = fmt.Sprintf("go run ./cmd/dealbridge chaos --deals %d --seed %d --relay %s --load %v", r.cfg.Deals, r.cfg.Seed, r.cfg.Relay, r.cfg.Load)
	if len(r.cfg.Kinds) != len(kindTable) {
		var ks []string
		for _, k := range r.cfg.Kinds {
			ks = append(ks, string(k))
		}
		rep.Command += " --faults " + strings.Join(ks, ",")
	}

	// Faults injected by kind: scheduled windows, plus per-deal faults.
	for _, w := range rep.Windows {
		if w.Err == "" {
			rep.Injected[w.Kind]++
		}
	}
	perDeal := map[Kind]func(p dealPlan) bool{
		ERP4xx:      func(p dealPlan) bool { return p.Customer == rejectCustomer },
		SlowCommit:  func(p dealPlan) bool { return p.Slow },
		DoubleClose: func(p dealPlan) bool { return p.Double != "" },
		DupWebhook:  func(p dealPlan) bool { return p.Dup },
	}
	for k, f := range perDeal {
		for _, p := range r.plans {
			if f(p) {
				rep.Injected[k]++
			}
		}
	}
	if n := len(rep.Reinjects); n > 0 {
		rep.Injected[DoubleReinject] = n // dead letters re-injected concurrently
	}
	if res.Creates > 0 {
		rep.AttemptsPer = float64(res.Attempts) / float64(res.Creates)
	}

	// Latency from the first close to the deal's terminal state.
	first := map[int]float64{}
	for _, op := range r.hist.all() {
		if (op.F == "close-won" || op.F == "close-lost") && (first[op.Deal] == 0 || op.Invoke < first[op.Deal]) {
			first[op.Deal] = op.Invoke
		}
	}
	lat := map[int]float64{}
	var all []float64
	for i, t := range res.Terminal {
		if f, ok := first[i]; ok && t >= f {
			lat[i] = t - f
			all = append(all, t-f)
		}
	}
	rep.LatP50, rep.LatP99, rep.LatMax = percentile(all, 0.5), percentile(all, 0.99), percentile(all, 1)

	// Per fault class: the deals whose life (first close → terminal, or
	// the end of the drain) overlaps one of the kind's windows (an instant
	// fault affects what is in flight over the next 5 s).
	for _, ki := range kindTable {
		if !r.cfg.enabled(ki.kind) {
			continue
		}
		row := KindRow{Kind: ki.kind, F: ki.f, What: ki.what, Injected: rep.Injected[ki.kind]}
		var ws [][2]float64
		for _, w := range rep.Windows {
			if w.Kind == ki.kind && w.Err == "" {
				ws = append(ws, [2]float64{w.Start, max(w.End, w.Start+5)})
			}
		}
		var ls []float64
		for i, p := range r.plans {
			f, ok := first[i]
			if !ok {
				continue
			}
			affected := false
			if pf := perDeal[ki.kind]; pf != nil {
				affected = pf(p)
			} else if ki.kind == DoubleReinject {
				affected = strings.HasPrefix(p.Customer, "C-FIX-")
			} else {
				end := rep.DrainEnd
				if t, ok := res.Terminal[i]; ok {
					end = t
				}
				for _, w := range ws {
					if f <= w[1] && end >= w[0] {
						affected = true
						break
					}
				}
			}
			if !affected {
				continue
			}
			row.Affected++
			v := res.Verdicts[i]
			if slices.Contains(failing, v) {
				row.Violations++
			}
			switch v {
			case VRecovered:
				row.Recovered++
			case VCompensated:
				row.Comp++
			}
			if l, ok := lat[i]; ok {
				ls = append(ls, l)
			}
		}
		row.P50, row.P99, row.Max = percentile(ls, 0.5), percentile(ls, 0.99), percentile(ls, 1)
		rep.PerKind = append(rep.PerKind, row)
	}
	rep.PassOK = res.Pass() && !rep.DrainTimed
	return rep
}

func secs(x float64) string {
	if x < 0 || math.IsNaN(x) {
		return "–"
	}
	return fmt.Sprintf("%.2f s", x)
}

// Markdown renders the report.
func (r *Report) Markdown() string {
	var b strings.Builder
	c := r.Check
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	verdict := "**PASS**"
	if !r.PassOK {
		verdict = "**FAIL**"
	}
	totalFaults := 0
	for _, n := range r.Injected {
		totalFaults += n
	}
	p("# %s\n\n", r.Title)
	p("%s — N = %d deals under %d injected faults: lost %d, duplicated %d, both %d, stuck %d, unexpected %d, inconsistent %d; drain %.1f s after the load; %.2f ERP attempts per invoice.\n\n",
		verdict, r.Deals, totalFaults, c.Counts[VLost], c.Counts[VDuplicated], c.Counts[VBoth], c.Counts[VStuck], c.Counts[VUnexpected],
		c.Counts[VInconsistent], r.DrainTime, r.AttemptsPer)
	p("![timeline](timeline.svg)\n\n")
	p("## Run\n\n| | |\n|---|---|\n")
	p("| seed | %d |\n| deals | %d (%d handlers, relay: %s) |\n| load | %.0f s (deals and faults spread over it) |\n", r.Seed, r.Deals, r.Handlers, r.Relay, r.Load)
	p("| load end → drained | %.1f s → %.1f s (drain %.1f s%s) |\n| whole run | %.1f s |\n", r.LoadEnd, r.DrainEnd, r.DrainTime,
		map[bool]string{true: ", **timed out**", false: ""}[r.DrainTimed], r.Total)
	p("| close → terminal state | p50 %s, p99 %s, max %s |\n", secs(r.LatP50), secs(r.LatP99), secs(r.LatMax))
	p("| versions | %s |\n| reproduce | `%s` |\n\n", r.Versions, r.Command)

	p("## Verdicts (checker: generator history + service database + ERP ledger)\n\n")
	p("| verdict | deals | |\n|---|---:|---|\n")
	for _, v := range []string{VInvoiced, VRecovered, VReinjected, VCompensated, VClosedLost, VNotClosed} {
		p("| %s | %d | allowed |\n", v, c.Counts[v])
	}
	for _, v := range failing {
		p("| %s | %d | **must be 0** |\n", v, c.Counts[v])
	}
	p("\nCloses acknowledged (2xx): %d; outcome unknown to the CRM (timeouts, resets, 5xx): %d; committed DealWon: %d. ERP: %d attempts, %d creates, %.2f attempts per invoice; attempts by outcome %v. ERP invoices whose reference no generated deal has: %d.\n\n",
		c.Acked, c.Maybe, c.Committed, c.Attempts, c.Creates, r.AttemptsPer, c.Outcomes, c.Unreferred)

	p("## Per fault class\n\nA deal is *affected* by a scheduled fault when its life (first close → terminal state) overlaps the fault's window (instant faults: the 5 s after them); per-deal faults affect the deals they were applied to.\n\n")
	p("| F | fault | injected | deals affected | violations | recovered | compensated | close→terminal p50 / p99 / max |\n|---|---|---:|---:|---:|---:|---:|---|\n")
	for _, k := range r.PerKind {
		p("| %s | `%s`: %s | %d | %d | %d | %d | %d | %s / %s / %s |\n", k.F, k.Kind, k.What, k.Injected, k.Affected, k.Violations, k.Recovered, k.Comp,
			secs(k.P50), secs(k.P99), secs(k.Max))
	}
	p("\nF13 (clock skew) is not injected: libfaketime does not reach Go's time.Now (vDSO), and dealbridge's backoff and leases use the database's now().\n\n")

	p("## Crash points\n\n| point | armed | hit (process SIGKILLed itself) | run |\n|---|---:|---:|---|\n")
	points := map[string]bool{}
	for k := range r.Armed {
		points[k] = true
	}
	for k := range c.CrashHits {
		points[k] = true
	}
	var ps []string
	for k := range points {
		ps = append(ps, k)
	}
	sort.Strings(ps)
	for _, k := range ps {
		p("| `%s` | %d | %d | %s |\n", k, r.Armed[k], c.CrashHits[k], verdict)
	}
	p("\n(A point armed with @N fires at its N-th hit; one armed in a process that another fault kills first does not fire.)\n\n")

	p("## Invariants\n\n| invariant | | detail |\n|---|---|---|\n")
	for _, inv := range c.Invariants {
		ok := "ok"
		switch {
		case !inv.OK && inv.Warn:
			ok = "finding"
		case !inv.OK:
			ok = "**FAIL**"
		}
		p("| %s | %s | %s |\n", inv.Name, ok, strings.ReplaceAll(strings.ReplaceAll(inv.Detail, "\n", " "), "|", "\\|"))
	}
	if c.Replay == "" {
		p("\n`dealbridge replay --verify` is not available in this binary; skipped.\n")
	}
	if len(c.Violations) > 0 {
		p("\n## Violations (first 50 of %d)\n\n", len(c.Violations))
		for i, v := range c.Violations {
			if i == 50 {
				break
			}
			p("- deal #%d `%s`: **%s** — %s\n", v.Deal, v.DealID, v.Verdict, v.Detail)
		}
	}
	p("\n## Fault schedule (seed %d)\n\nDrawn from the seed before the run; times from the start of the load. The deal plan (customers, lines, slow producers, double closes, re-sent closes) is drawn from the same seed. What the OS schedules (which request a fault hits) is not reproducible; the faults are.\n\n", r.Seed)
	p("| at | kind | for | param | applied (run s) | note |\n|---:|---|---:|---:|---|---|\n")
	ws := slices.Clone(r.Windows)
	sort.SliceStable(ws, func(i, j int) bool { return ws[i].Start < ws[j].Start })
	for i, f := range r.Schedule {
		applied := ""
		for j, w := range ws {
			if w.Kind == f.Kind {
				applied = fmt.Sprintf("%.1f–%.1f", w.Start, w.End)
				note := w.Note
				if w.Err != "" {
					note += " error: " + w.Err
				}
				applied += " | " + strings.ReplaceAll(note, "|", "\\|")
				ws = slices.Delete(ws, j, j+1)
				break
			}
		}
		if applied == "" {
			applied = "not applied |"
		}
		p("| %.1f s | %s | %v | %d | %s |\n", f.At.Seconds(), f.Kind, f.For, f.Param, applied)
		_ = i
	}
	return b.String()
}

// Write writes report.md, timeline.svg, schedule.json and result.json to
// dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "report.md"), []byte(r.Markdown()), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "timeline.svg"), []byte(r.SVG()), 0o644); err != nil {
		return err
	}
	sched, err := json.MarshalIndent(struct {
		Seed     int64   `json:"seed"`
		Deals    int     `json:"deals"`
		Load     string  `json:"load"`
		Schedule []Fault `json:"schedule"`
	}{r.Seed, r.Deals, time.Duration(r.Load * float64(time.Second)).String(), r.Schedule}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "schedule.json"), sched, 0o644); err != nil {
		return err
	}
	res, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "result.json"), res, 0o644)
}
