package cli

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/dealbridge/dealbridge/integration/chaos"
)

// runChaos runs a chaos run: this binary's api, relay, handlers and
// erp-sim as OS processes on a private Postgres cluster, under the faults
// of the fault matrix, then the independent checker and the report.
func runChaos(ctx context.Context, env Env, args []string) error {
	var (
		cfg      chaos.Config
		faults   string
		control  bool
		keep     bool
		seed     int
		deals    int
		handlers int
	)
	f := newFlags(env, "chaos", "chaos [--deals N] [--seed S] [--out DIR] [flags]")
	f.int(&deals, "deals", "DEALBRIDGE_CHAOS_DEALS", 500, "deals driven through the system")
	f.int(&seed, "seed", "DEALBRIDGE_CHAOS_SEED", 1, "seed of the deal plan and the fault schedule (a run reproduces from it)")
	f.string(&cfg.OutDir, "out", "DEALBRIDGE_CHAOS_OUT", "", "directory for report.md, timeline.svg, schedule.json, result.json")
	f.string(&cfg.Relay, "relay", "DEALBRIDGE_CHAOS_RELAY", chaos.RelayXID8, "xid8 (the real relay process) or naive (id > last_id: the positive control)")
	f.duration(&cfg.Load, "load", "DEALBRIDGE_CHAOS_LOAD", 0, "time the deals and faults are spread over (0: max(60s, deals/40 per second))")
	f.duration(&cfg.Drain, "drain", "DEALBRIDGE_CHAOS_DRAIN", 3*time.Minute, "longest wait for every saga to end after the load")
	f.string(&faults, "faults", "DEALBRIDGE_CHAOS_FAULTS", "all", "comma-separated fault kinds, or all: "+kindList())
	f.int(&handlers, "handlers", "DEALBRIDGE_CHAOS_HANDLERS", 2, "handler processes")
	f.string(&cfg.WorkDir, "work-dir", "DEALBRIDGE_CHAOS_WORK_DIR", "", "directory for the cluster, the ERP store and process logs (default: a temporary one)")
	f.BoolVar(&keep, "keep", false, "keep the temporary work directory (process logs) after the run")
	f.BoolVar(&control, "positive-control", false, "run the positive control: naive relay, out-of-order commits only; exit 0 when the checker sees loss")
	if err := f.parse(args); err != nil {
		return err
	}
	cfg.Deals, cfg.Seed, cfg.Handlers, cfg.KeepWorkDir = deals, int64(seed), handlers, keep
	if faults != "all" && faults != "" {
		for _, k := range strings.Split(faults, ",") {
			cfg.Kinds = append(cfg.Kinds, chaos.Kind(strings.TrimSpace(k)))
		}
	}
	if control {
		cfg = chaos.PositiveControl(cfg)
	}
	bin, err := os.Executable()
	if err != nil {
		return err
	}
	cfg.Bin = bin
	cfg.Log = env.Stderr
	rep, err := chaos.Run(ctx, cfg)
	if err != nil {
		return err
	}
	fmt.Fprintln(env.Stdout, rep.Summary())
	if rep.WorkDir != "" && keep {
		fmt.Fprintln(env.Stdout, "process logs:", rep.WorkDir+"/logs")
	}
	if control {
		if rep.Check.Counts[chaos.VLost] == 0 {
			return fmt.Errorf("positive control: the checker saw no loss from the naive relay")
		}
		fmt.Fprintln(env.Stdout, "positive control: the checker saw the naive relay lose deals, as it must")
		return nil
	}
	if !rep.Pass() {
		return fmt.Errorf("chaos run failed: see the report")
	}
	return nil
}

func kindList() string {
	var ks []string
	for _, k := range chaos.AllKinds() {
		ks = append(ks, string(k))
	}
	return strings.Join(ks, ", ")
}
