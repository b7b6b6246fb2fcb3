package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/cmd/app"
)

// errChainBroken makes `audit verify` exit 1 after printing its report.
var errChainBroken = errors.New("the event log's hash chain is broken: see the events named above")

// runAuditVerify recomputes the hash chain of every event stream and names
// the first edited, inserted or deleted event of each broken stream.
func runAuditVerify(ctx context.Context, env Env, args []string) error {
	var (
		c      common
		asJSON bool
		expect string
		stream stringList
	)
	f := newFlags(env, "audit verify", "audit verify [--stream ID]... [--expect-digest HEX] [--json] [flags]")
	c.register(f)
	f.BoolVar(&asJSON, "json", false, "print the report as JSON")
	f.Var(&stream, "stream", "verify only this stream (repeatable), e.g. deal-<id>")
	f.StringVar(&expect, "expect-digest", "", "fail unless the head digest equals this one (kept from an earlier run)")
	if err := f.parse(args); err != nil {
		return err
	}
	if err := c.requireDB(); err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-audit", 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	rep, err := postgres.VerifyChain(ctx, pool, stream...)
	if err != nil {
		return err
	}
	if asJSON {
		if err := writeJSONTo(env.Stdout, rep); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(env.Stdout, "checked %d events in %d streams in %s\n", rep.Events, rep.Streams, rep.Elapsed.Round(time.Millisecond))
		for _, p := range rep.Problems {
			fmt.Fprintf(env.Stdout, "BAD %s\n", p)
		}
		fmt.Fprintf(env.Stdout, "head digest %s\n", rep.HeadDigest)
		if rep.OK() {
			fmt.Fprintln(env.Stdout, "ok: every stream's hash chain is intact")
		}
	}
	if !rep.OK() {
		return errChainBroken
	}
	if expect != "" && expect != rep.HeadDigest {
		return fmt.Errorf("head digest %s differs from the expected %s: the log was rewritten or has grown since", rep.HeadDigest, expect)
	}
	return nil
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return fmt.Sprint([]string(*s)) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }
