package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/projections"
)

// errDrift makes `replay --verify` exit 1 after printing its drift report.
var errDrift = errors.New("drift: the live projections differ from the event log (report above)")

// runReplay rebuilds every projection from the event log into the shadow
// schema; --verify compares it with the live tables; --swap puts it live.
func runReplay(ctx context.Context, env Env, args []string) error {
	var (
		c                        common
		rebuild, verify, doSwap  bool
		asJSON, quiet            bool
		writers, batch, maxDiffs int
	)
	f := newFlags(env, "replay", "replay [--rebuild] [--verify] [--swap] [flags]")
	c.register(f)
	f.BoolVar(&rebuild, "rebuild", false, "rebuild every projection from the event log into schema "+projections.ShadowSchema+" (the default action)")
	f.BoolVar(&verify, "verify", false, "also compare the rebuilt tables with the live ones; exit 1 with a drift report when they differ")
	f.BoolVar(&doSwap, "swap", false, "then replace the live tables' contents with the rebuilt ones, atomically (writers wait for the swap)")
	f.BoolVar(&asJSON, "json", false, "print the report as JSON")
	f.BoolVar(&quiet, "quiet", false, "no progress on stderr")
	f.int(&writers, "writers", "DEALBRIDGE_REPLAY_WRITERS", 2, "connections folding events in parallel")
	f.int(&batch, "batch-size", "DEALBRIDGE_REPLAY_BATCH_SIZE", 1000, "events per shadow write transaction")
	f.IntVar(&maxDiffs, "max-diff-rows", 20, "differing rows shown per table")
	if err := f.parse(args); err != nil {
		return err
	}
	_ = rebuild // rebuilding is what every replay does first
	if f.NArg() > 0 {
		return &usageError{msg: fmt.Sprintf("unexpected argument %q", f.Arg(0))}
	}
	if writers < 1 || batch < 1 {
		return &usageError{msg: "--writers and --batch-size must be at least 1"}
	}
	if err := c.requireDB(); err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-replay", 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	opts := projections.Options{Verify: verify, Swap: doSwap, Writers: writers, BatchSize: batch, MaxDiffRows: maxDiffs}
	if !quiet {
		opts.Progress = func(p projections.Progress) {
			if p.Elapsed < 2*time.Second && p.Done < p.Total {
				return // short runs stay silent
			}
			pct := 100.0
			if p.Total > 0 {
				pct = 100 * float64(p.Done) / float64(p.Total)
			}
			fmt.Fprintf(env.Stderr, "replay: %d/%d events (%.0f%%), %.0f events/s\n", p.Done, p.Total, pct,
				float64(p.Done)/max(p.Elapsed.Seconds(), 1e-9))
		}
	}
	rep, err := projections.Replay(ctx, pool, opts)
	if err != nil {
		return err
	}
	if asJSON {
		if err := writeJSONTo(env.Stdout, rep); err != nil {
			return err
		}
	} else {
		rep.Format(env.Stdout)
	}
	if verify && rep.Drift() && !doSwap {
		return errDrift
	}
	return nil
}
