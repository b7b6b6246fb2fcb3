package cli

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/dealbridge/dealbridge/adapters/postgres"
)

// runAuditList prints the audit log of operator actions, newest first.
func runAuditList(ctx context.Context, env Env, args []string) error {
	var (
		o  opFlags
		af postgres.AuditFilter
	)
	f := newFlags(env, "audit list", "audit list [--actor-filter NAME] [--action A] [--target-id ID] [--limit N] [--json]")
	o.register(f, false)
	f.StringVar(&af.Actor, "by", "", "only actions by this actor")
	f.StringVar(&af.Action, "action", "", "only this action (e.g. dead_letter.reinject)")
	f.StringVar(&af.TargetType, "target-type", "", "only this target type (dead_letter, alert, …)")
	f.StringVar(&af.TargetID, "target-id", "", "only this target")
	f.IntVar(&af.Limit, "limit", 100, "at most this many, newest first")
	if err := f.parse(args); err != nil {
		return err
	}
	store, _, closeFn, err := o.open(ctx, false)
	if err != nil {
		return err
	}
	defer closeFn()
	rows, err := store.ListAudit(ctx, af)
	if err != nil {
		return err
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, rows)
	}
	tw := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tAT\tACTOR\tROLE\tACTION\tTARGET\tREASON")
	for _, a := range rows {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s %s\t%s\n", a.ID, a.At.UTC().Format("2006-01-02 15:04:05"), a.Actor, a.Role, a.Action,
			a.TargetType, a.TargetID, clip(a.Reason, 60))
	}
	return tw.Flush()
}
