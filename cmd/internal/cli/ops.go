package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/cmd/app"
)

// subcommand runs one of several named subcommands.
func subcommand(ctx context.Context, env Env, group string, args []string, subs map[string]func(context.Context, Env, []string) error) error {
	names := make([]string, 0, len(subs))
	for n := range subs {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(env.Stderr, "Usage: dealbridge %s <%s> [flags]   (each takes --help)\n", group, strings.Join(names, "|"))
		if len(args) == 0 {
			return &usageError{msg: "expected a subcommand: " + strings.Join(names, ", ")}
		}
		return nil
	}
	fn, ok := subs[args[0]]
	if !ok {
		return &usageError{msg: fmt.Sprintf("unknown subcommand %q (expected %s)", args[0], strings.Join(names, ", "))}
	}
	return fn(ctx, env, args[1:])
}

// withID parses args of the form "ID [flags]" or "[flags] ID".
func withID(f *flags, args []string, what string) (string, error) {
	var id string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		id, args = args[0], args[1:]
	}
	if err := f.parse(args); err != nil {
		return "", err
	}
	if id == "" && f.NArg() > 0 {
		id = f.Arg(0)
	}
	if id == "" || f.NArg() > 1 || (f.NArg() == 1 && id != f.Arg(0)) {
		return "", &usageError{msg: "expected exactly one " + what + " id"}
	}
	return id, nil
}

type opFlags struct {
	common
	actor  string
	asJSON bool
}

func (o *opFlags) register(f *flags, withActor bool) {
	o.common.register(f)
	if withActor {
		f.string(&o.actor, "actor", "DEALBRIDGE_ACTOR", "", "who performs the action, recorded in the audit log (required)")
	}
	f.BoolVar(&o.asJSON, "json", false, "print JSON")
}

func (o *opFlags) open(ctx context.Context, needActor bool) (*postgres.Store, postgres.Actor, func(), error) {
	if needActor && strings.TrimSpace(o.actor) == "" {
		return nil, postgres.Actor{}, nil, &usageError{msg: "--actor is required (who performs the action, for the audit log)"}
	}
	if err := o.requireDB(); err != nil {
		return nil, postgres.Actor{}, nil, err
	}
	pool, err := app.NewPool(ctx, o.databaseURL, "dealbridge-cli", 4)
	if err != nil {
		return nil, postgres.Actor{}, nil, err
	}
	// The CLI talks to the database directly, so it acts with the rights of
	// whoever holds the database credentials: role "admin".
	return postgres.NewStore(pool), postgres.Actor{Name: o.actor, Role: "admin", RequestID: "cli-" + time.Now().UTC().Format("20060102T150405.000")}, pool.Close, nil
}

func runAlerts(ctx context.Context, env Env, args []string) error {
	return subcommand(ctx, env, "alerts", args, map[string]func(context.Context, Env, []string) error{
		"list":        alertsList,
		"acknowledge": alertsAck,
		"resolve":     alertsResolve,
	})
}

func alertsList(ctx context.Context, env Env, args []string) error {
	var (
		o     opFlags
		state string
		limit int
	)
	f := newFlags(env, "alerts list", "alerts list [flags]")
	o.register(f, false)
	f.StringVar(&state, "state", "", "only alerts in this state (open, acknowledged, resolved)")
	f.IntVar(&limit, "limit", 100, "at most this many, newest first")
	if err := f.parse(args); err != nil {
		return err
	}
	switch state {
	case "", "open", "acknowledged", "resolved":
	default:
		return &usageError{msg: fmt.Sprintf("invalid --state %q (open, acknowledged or resolved)", state)}
	}
	if limit < 1 || limit > 100000 {
		return &usageError{msg: "--limit must be between 1 and 100000"}
	}
	store, _, closeFn, err := o.open(ctx, false)
	if err != nil {
		return err
	}
	defer closeFn()
	alerts, err := store.ListAlerts(ctx, state, limit)
	if err != nil {
		return err
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, alerts)
	}
	tw := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tSEVERITY\tKIND\tDEAL\tCREATED\tMESSAGE")
	for _, a := range alerts {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.State, a.Severity, a.Kind, deref(a.DealID),
			a.CreatedAt.UTC().Format("2006-01-02 15:04:05"), clip(a.Message, 80))
	}
	return tw.Flush()
}

func alertsAck(ctx context.Context, env Env, args []string) error {
	var o opFlags
	f := newFlags(env, "alerts acknowledge", "alerts acknowledge ID --actor NAME")
	o.register(f, true)
	id, err := withID(f, args, "alert")
	if err != nil {
		return err
	}
	store, actor, closeFn, err := o.open(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if err := store.AcknowledgeAlert(ctx, id, actor); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "alert %s acknowledged\n", id)
	return nil
}

func alertsResolve(ctx context.Context, env Env, args []string) error {
	var (
		o      opFlags
		reason string
	)
	f := newFlags(env, "alerts resolve", "alerts resolve ID --reason TEXT --actor NAME")
	o.register(f, true)
	f.StringVar(&reason, "reason", "", "why the alert is resolved (required)")
	id, err := withID(f, args, "alert")
	if err != nil {
		return err
	}
	if strings.TrimSpace(reason) == "" {
		return &usageError{msg: "--reason is required"}
	}
	store, actor, closeFn, err := o.open(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if err := store.ResolveAlert(ctx, id, reason, actor); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "alert %s resolved\n", id)
	return nil
}

func runDLQ(ctx context.Context, env Env, args []string) error {
	return subcommand(ctx, env, "dlq", args, map[string]func(context.Context, Env, []string) error{
		"list":          dlqList,
		"show":          dlqShow,
		"edit":          dlqEdit,
		"reinject":      dlqReinject,
		"discard":       dlqDiscard,
		"approve":       dlqApprove,
		"bulk-reinject": dlqBulk,
	})
}

type filterFlags struct {
	f            postgres.DeadLetterFilter
	since, until string
}

func (ff *filterFlags) register(f *flags) {
	f.StringVar(&ff.f.State, "state", "", "open, reinjected, discarded or resolved")
	f.StringVar(&ff.f.ErrorClass, "error-class", "", "permanent, exhausted, poison, …")
	f.StringVar(&ff.f.Reason, "reason-text", "", "words that must appear in the reason")
	f.StringVar(&ff.since, "since", "", "created at or after (RFC 3339, or a duration such as 2h meaning that long ago)")
	f.StringVar(&ff.until, "until", "", "created before (RFC 3339 or a duration ago)")
	f.StringVar(&ff.f.DealID, "deal", "", "only this deal's entries")
	f.StringVar(&ff.f.Topic, "topic", "", "origin topic")
	f.StringVar(&ff.f.Handler, "handler", "", "origin handler")
}

func (ff *filterFlags) resolve() error {
	for _, p := range []struct {
		s    string
		t    *time.Time
		name string
	}{{ff.since, &ff.f.Since, "since"}, {ff.until, &ff.f.Until, "until"}} {
		if p.s == "" {
			continue
		}
		if d, err := time.ParseDuration(p.s); err == nil {
			*p.t = time.Now().Add(-d)
			continue
		}
		t, err := time.Parse(time.RFC3339, p.s)
		if err != nil {
			return &usageError{msg: fmt.Sprintf("--%s %q is neither RFC 3339 nor a duration", p.name, p.s)}
		}
		*p.t = t
	}
	return nil
}

func dlqList(ctx context.Context, env Env, args []string) error {
	var (
		o      opFlags
		ff     filterFlags
		limit  int
		cursor string
		all    bool
	)
	f := newFlags(env, "dlq list", "dlq list [flags]")
	o.register(f, false)
	ff.register(f)
	f.IntVar(&limit, "limit", 100, "entries per page (1-1000)")
	f.StringVar(&cursor, "cursor", "", "continue after this cursor (printed after a page)")
	f.BoolVar(&all, "all", false, "follow the cursor to the end")
	if err := f.parse(args); err != nil {
		return err
	}
	if err := ff.resolve(); err != nil {
		return err
	}
	store, _, closeFn, err := o.open(ctx, false)
	if err != nil {
		return err
	}
	defer closeFn()
	var items []postgres.DeadLetterView
	next := postgres.Cursor(cursor)
	for {
		page, err := store.ListDeadLetters(ctx, ff.f, next, limit)
		if err != nil {
			return err
		}
		items = append(items, page.Items...)
		next = page.Next
		if !all || next == "" {
			break
		}
	}
	if items == nil {
		items = []postgres.DeadLetterView{}
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, items)
	}
	tw := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tCLASS\tATTEMPTS\tREV\tDEAL\tCREATED\tREASON")
	for _, d := range items {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", d.ID, d.State, d.ErrorClass, d.Attempts, d.Revision, deref(d.DealID),
			d.CreatedAt.UTC().Format("2006-01-02 15:04:05"), clip(d.Reason, 70))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if next != "" {
		fmt.Fprintf(env.Stdout, "more: --cursor %s\n", next)
	}
	return nil
}

func dlqShow(ctx context.Context, env Env, args []string) error {
	var o opFlags
	f := newFlags(env, "dlq show", "dlq show ID [--json]")
	o.register(f, false)
	id, err := withID(f, args, "dead letter")
	if err != nil {
		return err
	}
	store, _, closeFn, err := o.open(ctx, false)
	if err != nil {
		return err
	}
	defer closeFn()
	d, err := store.GetDeadLetter(ctx, id)
	if err != nil {
		return err
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, d)
	}
	w := env.Stdout
	fmt.Fprintf(w, "dead letter %s  state %s  class %s  attempts %d  re-injected %d time(s)\n", d.ID, d.State, d.ErrorClass, d.Attempts, d.Reinjects)
	fmt.Fprintf(w, "deal %s  key %s  topic %s  handler %s\n", deref(d.DealID), deref(d.IdempotencyKey), d.Topic, d.Handler)
	fmt.Fprintf(w, "first failure %s  last failure %s\nreason: %s\n", d.FirstFailureAt.UTC().Format(time.RFC3339), d.LastFailureAt.UTC().Format(time.RFC3339), d.Reason)
	if d.NeedsApproval {
		fmt.Fprintf(w, "revision %d changes money fields and %s\n", d.Revision, map[bool]string{true: "is approved by " + deref(d.ApprovedBy), false: "awaits approval"}[d.ApprovedBy != nil])
	}
	fmt.Fprintln(w, "\nrevisions:")
	for _, r := range d.Revisions {
		fmt.Fprintf(w, "  #%d %s %s %s\n    %s\n", r.Number, r.Actor, r.Reason, string(r.Patch), string(r.Payload))
	}
	fmt.Fprintln(w, "\nERP attempts:")
	for _, a := range d.AttemptHistory {
		fmt.Fprintf(w, "  %s %s\n", a.RecordedAt.UTC().Format(time.RFC3339), string(a.Payload))
	}
	fmt.Fprintln(w, "\nhistory:")
	for _, e := range d.History {
		fmt.Fprintf(w, "  %s %s\n", e.RecordedAt.UTC().Format(time.RFC3339), e.Type)
	}
	return nil
}

func dlqEdit(ctx context.Context, env Env, args []string) error {
	var (
		o      opFlags
		file   string
		reason string
	)
	f := newFlags(env, "dlq edit", "dlq edit ID --payload-file F --reason TEXT --actor NAME")
	o.register(f, true)
	f.StringVar(&file, "payload-file", "", "file holding the new JSON payload (- for stdin) (required)")
	f.StringVar(&reason, "reason", "", "why the payload is changed (required)")
	id, err := withID(f, args, "dead letter")
	if err != nil {
		return err
	}
	if file == "" || strings.TrimSpace(reason) == "" {
		return &usageError{msg: "--payload-file and --reason are required"}
	}
	var payload []byte
	if file == "-" {
		payload, err = io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	} else {
		payload, err = os.ReadFile(file)
	}
	if err != nil {
		return fmt.Errorf("cannot read the payload: %w", err)
	}
	store, actor, closeFn, err := o.open(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	rev, err := store.EditDeadLetter(ctx, id, payload, reason, actor)
	if err != nil {
		return err
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, rev)
	}
	fmt.Fprintf(env.Stdout, "dead letter %s: revision %d stored (patch %s)\n", id, rev.Number, rev.Patch)
	if rev.NeedsApproval {
		fmt.Fprintln(env.Stdout, "money fields changed: another operator must approve (dealbridge dlq approve) before re-inject")
	}
	return nil
}

func dlqApprove(ctx context.Context, env Env, args []string) error {
	var o opFlags
	f := newFlags(env, "dlq approve", "dlq approve ID --actor NAME")
	o.register(f, true)
	id, err := withID(f, args, "dead letter")
	if err != nil {
		return err
	}
	store, actor, closeFn, err := o.open(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if err := store.ApproveDeadLetter(ctx, id, actor); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "dead letter %s: latest revision approved by %s\n", id, actor.Name)
	return nil
}

func dlqReinject(ctx context.Context, env Env, args []string) error {
	var (
		o      opFlags
		reason string
		newKey bool
	)
	f := newFlags(env, "dlq reinject", "dlq reinject ID --reason TEXT --actor NAME [--new-key]")
	o.register(f, true)
	f.StringVar(&reason, "reason", "", "why the entry is re-injected (required)")
	f.BoolVar(&newKey, "new-key", false, "re-inject under a new idempotency key (recorded) instead of the same K")
	id, err := withID(f, args, "dead letter")
	if err != nil {
		return err
	}
	if strings.TrimSpace(reason) == "" {
		return &usageError{msg: "--reason is required"}
	}
	store, actor, closeFn, err := o.open(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	res, err := store.ReinjectDeadLetter(ctx, id, postgres.ReinjectOptions{Reason: reason, NewKey: newKey}, actor)
	if err != nil {
		return err
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, res)
	}
	fmt.Fprintf(env.Stdout, "dead letter %s re-injected (revision %d, key %s, deal %s)\n", id, res.Revision, res.IdempotencyKey, res.DealID)
	return nil
}

func dlqDiscard(ctx context.Context, env Env, args []string) error {
	var (
		o      opFlags
		reason string
	)
	f := newFlags(env, "dlq discard", "dlq discard ID --reason TEXT --actor NAME")
	o.register(f, true)
	f.StringVar(&reason, "reason", "", "why the entry is discarded (required)")
	id, err := withID(f, args, "dead letter")
	if err != nil {
		return err
	}
	if strings.TrimSpace(reason) == "" {
		return &usageError{msg: "--reason is required"}
	}
	store, actor, closeFn, err := o.open(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if err := store.DiscardDeadLetter(ctx, id, reason, actor); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "dead letter %s discarded\n", id)
	return nil
}

func dlqBulk(ctx context.Context, env Env, args []string) error {
	var (
		o        opFlags
		ff       filterFlags
		reason   string
		dryRun   bool
		perSec   float64
		resume   string
		maxReinj int
	)
	f := newFlags(env, "dlq bulk-reinject", "dlq bulk-reinject [filters] --reason TEXT --actor NAME [--dry-run] [--rate N] | --resume OP_ID")
	o.register(f, true)
	ff.register(f)
	f.StringVar(&reason, "reason", "", "why the entries are re-injected (required)")
	f.BoolVar(&dryRun, "dry-run", false, "only count the entries the filter selects, by error class")
	f.Float64Var(&perSec, "rate", 50, "re-injects per second (0: unlimited)")
	f.StringVar(&resume, "resume", "", "resume the operation with this id after a crash")
	f.IntVar(&maxReinj, "max-reinjects", postgres.DefaultMaxReinjects, "loop guard: skip entries re-injected this many times already")
	if err := f.parse(args); err != nil {
		return err
	}
	if err := ff.resolve(); err != nil {
		return err
	}
	if ff.f.State != "" && ff.f.State != "open" {
		return &usageError{msg: "bulk re-inject selects open entries only; drop --state"}
	}
	store, actor, closeFn, err := o.open(ctx, !dryRun)
	if err != nil {
		return err
	}
	defer closeFn()
	if dryRun {
		plan, err := store.PlanBulkReinject(ctx, ff.f)
		if err != nil {
			return err
		}
		if o.asJSON {
			return writeJSONTo(env.Stdout, plan)
		}
		fmt.Fprintf(env.Stdout, "%d open dead letter(s) would be re-injected\n", plan.Count)
		for c, n := range plan.ByErrorClass {
			fmt.Fprintf(env.Stdout, "  %-12s %d\n", c, n)
		}
		return nil
	}
	op := resume
	if op == "" {
		if strings.TrimSpace(reason) == "" {
			return &usageError{msg: "--reason is required"}
		}
		var total int
		op, total, err = store.StartBulkReinject(ctx, ff.f, reason, actor)
		if err != nil {
			return err
		}
		fmt.Fprintf(env.Stderr, "bulk operation %s: %d entries (resume with --resume %s)\n", op, total, op)
	}
	p, err := store.RunBulkReinject(ctx, op, perSec, maxReinj, func(p postgres.BulkProgress) {
		fmt.Fprintf(env.Stderr, "  %d/%d done, %d skipped\n", p.Done, p.Total, p.Skipped)
	})
	if err != nil {
		return err
	}
	if ctx.Err() != nil {
		return fmt.Errorf("interrupted after %d of %d; resume with --resume %s", p.Done+p.Skipped, p.Total, op)
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, p)
	}
	fmt.Fprintf(env.Stdout, "bulk operation %s: %d re-injected, %d skipped of %d\n", op, p.Done, p.Skipped, p.Total)
	return nil
}

func writeJSONTo(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func deref(s *string) string {
	if s == nil {
		return "-"
	}
	return *s
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n-1] + "…"
	}
	return s
}
