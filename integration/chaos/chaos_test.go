package chaos

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/crashpoint"
)

// bin is the dealbridge binary TestMain built.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "dealbridge-chaos-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "dealbridge")
	// Built without -race even under `go test -race`: five processes of a
	// race-instrumented binary on two cores would measure the race
	// detector, not dealbridge. (integration/ runs the race-built binary.)
	cmd := exec.Command("go", "build", "-o", bin, "github.com/dealbridge/dealbridge/cmd/dealbridge")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "chaos: go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// runChaos runs cfg in a fresh work directory; on failure it logs the
// report and the tail of every process log.
func runChaos(t *testing.T, cfg Config) *Report {
	t.Helper()
	dir, err := os.MkdirTemp("", "dealbridge-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Bin, cfg.WorkDir = bin, dir
	if out := os.Getenv("DEALBRIDGE_CHAOS_TEST_OUT"); out != "" {
		cfg.OutDir = filepath.Join(out, t.Name())
	}
	cfg.Log = testWriter{t}
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	rep, err := Run(ctx, cfg)
	if err != nil {
		logTails(t, dir)
		t.Fatalf("chaos run: %v", err)
	}
	t.Log(rep.Summary())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("report:\n%s", rep.Markdown())
			logTails(t, dir)
		}
	})
	return rep
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func logTails(t *testing.T, dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "logs", "*.log"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if len(b) > 6<<10 {
			b = b[len(b)-6<<10:]
		}
		t.Logf("---- %s (tail):\n%s", filepath.Base(f), b)
	}
}

// TestBoundedChaosRun is the CI run: 500 deals through api, relay, two
// handlers and erp-sim as OS processes, every fault kind injected, and the
// independent checker must find nothing lost, duplicated, both, stuck or
// unexpected.
func TestBoundedChaosRun(t *testing.T) {
	rep := runChaos(t, Config{Deals: 500, Seed: 7, Load: 60 * time.Second, Drain: 2 * time.Minute,
		Title: "bounded CI run: 500 deals, every fault kind"})
	c := rep.Check
	for _, v := range failing {
		if c.Counts[v] != 0 {
			t.Errorf("%s: %d deal(s), want 0", v, c.Counts[v])
		}
	}
	for i, v := range c.Violations {
		if i == 20 {
			break
		}
		t.Errorf("deal #%d %s: %s: %s", v.Deal, v.DealID, v.Verdict, v.Detail)
	}
	for _, inv := range c.Invariants {
		switch {
		case !inv.OK && inv.Warn:
			t.Logf("finding: %s: %s", inv.Name, inv.Detail)
		case !inv.OK:
			t.Errorf("invariant %q: %s", inv.Name, inv.Detail)
		}
	}
	if rep.DrainTimed {
		t.Errorf("the drain timed out")
	}
	if c.Replay == "" {
		t.Errorf("replay --verify did not run")
	}
	for _, k := range AllKinds() {
		if rep.Injected[k] == 0 {
			t.Errorf("fault kind %s was never injected", k)
		}
	}
	for _, p := range []string{crashpoint.AfterERP2xxBeforeCommit, crashpoint.AfterCommitBeforeAck, crashpoint.RelayAfterPublishBeforeOffsetAck} {
		if c.CrashHits[p] == 0 {
			t.Errorf("crash point %s never fired (armed %d times)", p, rep.Armed[p])
		}
	}
	if c.Counts[VInvoiced]+c.Counts[VRecovered] < 400 {
		t.Errorf("only %d deals invoiced: the run did too little to prove anything", c.Counts[VInvoiced]+c.Counts[VRecovered])
	}
	if c.Counts[VCompensated] == 0 || c.Counts[VReinjected] == 0 {
		t.Errorf("compensated %d, re-injected %d: want both paths exercised", c.Counts[VCompensated], c.Counts[VReinjected])
	}
	if !rep.Pass() {
		t.Errorf("the run did not pass")
	}
}

// TestPositiveControl shows that the checker can see loss: the same plan
// with a naive relay (id > last_id) under out-of-order commits loses deals,
// and the checker reports them; the real relay under the same plan loses
// none.
func TestPositiveControl(t *testing.T) {
	base := Config{Deals: 300, Seed: 11, Load: 20 * time.Second, Drain: time.Minute, Quiet: 8 * time.Second}
	t.Run("naive relay loses", func(t *testing.T) {
		rep := runChaos(t, PositiveControl(base))
		if rep.Check.Counts[VLost] == 0 {
			t.Fatalf("the checker found no lost deal behind the naive relay: %s", rep.Summary())
		}
		if rep.Pass() {
			t.Errorf("a run that lost %d deals passed", rep.Check.Counts[VLost])
		}
		for _, v := range rep.Check.Violations {
			if v.Verdict != VLost {
				t.Errorf("deal #%d: %s, want only lost deals: %s", v.Deal, v.Verdict, v.Detail)
			}
		}
	})
	t.Run("xid8 relay does not", func(t *testing.T) {
		cfg := PositiveControl(base)
		cfg.Relay, cfg.Title = RelayXID8, "baseline of the positive control: the real relay under the same out-of-order commits"
		rep := runChaos(t, cfg)
		if !rep.Pass() {
			t.Fatalf("the real relay under out-of-order commits: %s", rep.Summary())
		}
	})
}

func TestScheduleReproducesAndCoversEveryKind(t *testing.T) {
	cfg := Config{Deals: 500, Seed: 3, Bin: "x", Load: time.Minute}
	if err := cfg.defaults(); err != nil {
		t.Fatal(err)
	}
	a, b := schedulePlan(cfg), schedulePlan(cfg)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("the same seed drew two different schedules")
	}
	cfg.Seed = 4
	if reflect.DeepEqual(a, schedulePlan(cfg)) {
		t.Fatal("two seeds drew the same schedule")
	}
	seen := map[Kind]bool{}
	for _, f := range a.sched {
		seen[f.Kind] = true
		if f.At < 0 || f.At > cfg.Load {
			t.Errorf("fault %+v outside the load", f)
		}
	}
	for _, ki := range kindTable {
		if !ki.perDeal && !seen[ki.kind] {
			t.Errorf("kind %s not scheduled", ki.kind)
		}
	}
	var fix, rej, slow, dbl, dup int
	for _, p := range a.plans {
		if p.Fix {
			fix++
		}
		if p.Customer == rejectCustomer {
			rej++
		}
		if p.Slow {
			slow++
		}
		if p.Double != "" {
			dbl++
		}
		if p.Dup {
			dup++
		}
	}
	if fix == 0 || rej == 0 || slow == 0 || dbl == 0 || dup == 0 {
		t.Errorf("per-deal faults: fix %d, reject %d, slow %d, double %d, dup %d; want all > 0", fix, rej, slow, dbl, dup)
	}
	naive := PositiveControl(Config{Bin: "x"})
	if err := naive.defaults(); err != nil {
		t.Fatal(err)
	}
	for _, f := range schedulePlan(naive).sched {
		t.Errorf("positive control scheduled %s; it injects out-of-order commits only", f.Kind)
	}
}

func TestNiceCeilAndPercentile(t *testing.T) {
	for in, want := range map[float64]float64{0: 1, 0.3: 0.5, 7: 10, 11: 20, 100: 100, 101: 200} {
		if got := niceCeil(in); got != want {
			t.Errorf("niceCeil(%v) = %v, want %v", in, got, want)
		}
	}
	if p := percentile([]float64{5, 1, 3, 2, 4}, 0.5); p != 3 {
		t.Errorf("p50 = %v", p)
	}
}
