package bench_test

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/internal/bench"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// buildBinary builds the dealbridge binary whose subcommands the bench
// starts as child processes (without -race: the processes are measured,
// not checked).
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "dealbridge")
	cmd := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/dealbridge/dealbridge/cmd/dealbridge")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestQuickRun runs the whole benchmark in --quick mode against a real
// Postgres with real child processes, and checks that the report is
// written and that every contender invoiced every deal it closed exactly
// once. Nothing about speed is asserted.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("short mode: this test builds the binary and runs a relay, handlers, River and an ERP simulator as processes")
	}
	bin := buildBinary(t)
	out := filepath.Join(t.TempDir(), "report")
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	res, err := bench.Run(ctx, bench.Config{
		Bin:         bin,
		DatabaseURL: pgtest.NewDatabase(t),
		Quick:       true,
		OutDir:      out,
		Command:     "dealbridge bench --quick",
		Log:         slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"README.md", "chart.svg", "result.json"} {
		b, err := os.ReadFile(filepath.Join(out, name))
		if err != nil {
			t.Fatalf("report file: %v", err)
		}
		if len(b) == 0 {
			t.Fatalf("%s is empty", name)
		}
	}
	readme, _ := os.ReadFile(filepath.Join(out, "README.md"))
	for _, want := range []string{"# dealbridge benchmark", "dealbridge bench --quick", "## Ceiling", "## End to end", "## Exactly once", "chart.svg"} {
		if !strings.Contains(string(readme), want) {
			t.Errorf("README.md lacks %q", want)
		}
	}
	if svg, _ := os.ReadFile(filepath.Join(out, "chart.svg")); !strings.HasPrefix(string(svg), "<svg") || !strings.HasSuffix(strings.TrimSpace(string(svg)), "</svg>") {
		t.Error("chart.svg is not an SVG document")
	}

	seen := map[string]bool{}
	for _, p := range res.Phases {
		seen[p.Kind] = true
		v := p.Verify
		if !v.OK {
			t.Errorf("%s: %v", p.Name, v.Problems)
		}
		if p.Closed == 0 || v.Expected < p.Closed {
			t.Errorf("%s: %d closes in the window, %d in all", p.Name, p.Closed, v.Expected)
		}
		if p.Kind == bench.KindCeiling {
			if v.WonEvents != v.Expected || v.OutboxMessages != v.Expected {
				t.Errorf("%s: %d closes, %d DealWon, %d outbox messages", p.Name, v.Expected, v.WonEvents, v.OutboxMessages)
			}
			continue
		}
		// Exactly once, deal by deal: as many invoices (log, projection,
		// ERP, distinct keys) as successful closes, none twice.
		for what, got := range map[string]int{"DealWon": v.WonEvents, "InvoiceCreated": v.InvoiceEvents, "invoiced deals": v.InvoicedDeals,
			"ERP creates": v.ERPCreates, "ERP keys": v.ERPKeys} {
			if got != v.Expected {
				t.Errorf("%s: %s %d, want %d", p.Name, what, got, v.Expected)
			}
		}
		if v.ERPMaxPerKey != 1 || v.QueueLeft != 0 {
			t.Errorf("%s: max ERP invoices per key %d, queue left %d", p.Name, v.ERPMaxPerKey, v.QueueLeft)
		}
		if p.Latency == nil || p.Latency.N != p.Closed {
			t.Errorf("%s: latency of %v deals, want %d", p.Name, p.Latency, p.Closed)
		}
		if len(p.CPU) < 2 || p.CPU[0].PeakRSS == 0 {
			t.Errorf("%s: process stats %+v", p.Name, p.CPU)
		}
	}
	for _, k := range []string{bench.KindCeiling, bench.KindDealbridge, bench.KindRiver} {
		if !seen[k] {
			t.Errorf("no %s phase ran", k)
		}
	}
	if !res.Verified {
		t.Error("Result.Verified is false")
	}
	if res.Replay == nil || res.Replay.Events == 0 {
		t.Errorf("replay: %+v", res.Replay)
	}
	if res.Bulk == nil || res.Bulk.Done != res.Bulk.Entries || res.Bulk.Entries == 0 {
		t.Errorf("bulk re-inject: %+v", res.Bulk)
	}
}
