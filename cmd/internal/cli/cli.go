// Package cli implements dealbridge's command line: one binary, one
// subcommand per process or operation. Configuration comes from flags,
// each with an environment variable and a safe default.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"sort"
	"strconv"
	"strings"
	"time"
)

// Env is what a command may touch of its surroundings.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env Env, args []string) error
}

func commands() []command {
	return []command{
		{"dev", "run everything in one process on an embedded Postgres (first run, demos)", runDev},
		{"api", "serve the CRM-facing HTTP API", runAPI},
		{"relay", "relay the outbox to the work queue", runRelay},
		{"handler", "run the invoice saga handlers (any number of processes)", runHandler},
		{"erp-sim", "run the simulated ERP over HTTP", runERPSim},
		{"migrate", "apply, roll back or show database migrations (up|down|status)", runMigrate},
		{"alerts", "list, acknowledge, resolve alerts", runAlerts},
		{"dlq", "inspect, edit, approve, re-inject, discard dead letters (dlq list|show|edit|approve|reinject|discard|bulk-reinject)", runDLQ},
		{"users", "dashboard and operator-API users (users add|list|disable|enable|set-role|reset-password|token)", runUsers},
		{"chaos", "fault-injection run with an independent checker and a report (chaos --deals N --out DIR)", runChaos},
		{"replay", "rebuild every projection from the event log (--verify compares with live, --swap puts it live)", runReplay},
		{"audit", "verify the event log's hash chain (audit verify) or list operator actions (audit list)", runAudit},
		{"reconcile", "look up won deals without an invoice in the ERP: record found invoices, alert on missing ones", runReconcile},
		{"bench", "benchmark: the close ceiling, dealbridge end to end and River side by side, with a report (bench --out DIR, --quick)", runBench},
	}
}

// usageError is a mistake in the command line: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// Run runs the command line args and returns the exit status: 0 on
// success, 1 when the command failed, 2 for a bad command line. A failure
// is reported as one line on stderr.
func Run(ctx context.Context, args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = func(string) string { return "" }
	}
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		printUsage(env.Stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, env, args[1:])
		switch {
		case err == nil, errors.Is(err, flag.ErrHelp):
			return 0
		case errors.As(err, new(*usageError)):
			fmt.Fprintf(env.Stderr, "dealbridge %s: %v\n", c.name, err)
			return 2
		default:
			fmt.Fprintf(env.Stderr, "dealbridge %s: %s\n", c.name, oneLine(err.Error()))
			return 1
		}
	}
	fmt.Fprintf(env.Stderr, "dealbridge: unknown command %q (run 'dealbridge help')\n", args[0])
	return 2
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "dealbridge turns closed CRM deals into ERP invoices exactly once.")
	fmt.Fprintln(w, "\nUsage: dealbridge <command> [flags]   (dealbridge <command> --help for its flags)\n\nCommands:")
	cs := commands()
	sort.SliceStable(cs, func(i, j int) bool { return false })
	for _, c := range cs {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
}

// flags is a FlagSet whose defaults come from environment variables.
type flags struct {
	*flag.FlagSet
	env    Env
	envErr error // the first environment variable that did not parse
}

func newFlags(env Env, name, usage string) *flags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	fs.Usage = func() {
		fmt.Fprintf(env.Stderr, "Usage: dealbridge %s\n\nFlags (each also settable by the environment variable shown):\n", usage)
		fs.PrintDefaults()
	}
	return &flags{FlagSet: fs, env: env}
}

func (f *flags) string(p *string, name, envName, def, help string) {
	if v := f.env.Getenv(envName); v != "" {
		def = v
	}
	f.StringVar(p, name, def, help+" ($"+envName+")")
}

func (f *flags) duration(p *time.Duration, name, envName string, def time.Duration, help string) {
	if v := f.env.Getenv(envName); v != "" {
		if d, err := time.ParseDuration(v); err == nil {
			def = d
		} else if f.envErr == nil {
			f.envErr = fmt.Errorf("invalid $%s %q: want a duration such as 500ms or 10s", envName, v)
		}
	}
	f.DurationVar(p, name, def, help+" ($"+envName+")")
}

func (f *flags) int(p *int, name, envName string, def int, help string) {
	if v := f.env.Getenv(envName); v != "" {
		if n, err := strconv.Atoi(v); err == nil {
			def = n
		} else if f.envErr == nil {
			f.envErr = fmt.Errorf("invalid $%s %q: want an integer", envName, v)
		}
	}
	f.IntVar(p, name, def, help+" ($"+envName+")")
}

// parse parses args; a bad flag is a usage error, --help is flag.ErrHelp.
func (f *flags) parse(args []string) error {
	if err := f.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return &usageError{msg: err.Error()}
	}
	if f.envErr != nil {
		return &usageError{msg: f.envErr.Error()}
	}
	return nil
}

type common struct {
	databaseURL string
	logLevel    string
	logFormat   string
}

func (c *common) register(f *flags) {
	f.string(&c.databaseURL, "database-url", "DATABASE_URL", "", "PostgreSQL URL, e.g. postgres://user@127.0.0.1:5432/dealbridge")
	f.string(&c.logLevel, "log-level", "DEALBRIDGE_LOG_LEVEL", "info", "debug, info, warn or error")
	f.string(&c.logFormat, "log-format", "DEALBRIDGE_LOG_FORMAT", "text", "text or json")
}

func (c *common) logger(env Env) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.logLevel)); err != nil {
		return nil, &usageError{msg: fmt.Sprintf("invalid --log-level %q", c.logLevel)}
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch c.logFormat {
	case "text":
		return slog.New(slog.NewTextHandler(env.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(env.Stderr, opts)), nil
	}
	return nil, &usageError{msg: fmt.Sprintf("invalid --log-format %q (text or json)", c.logFormat)}
}

func (c *common) requireDB() error {
	if c.databaseURL == "" {
		return &usageError{msg: "no database: set DATABASE_URL or --database-url (or use 'dealbridge dev' for an embedded one)"}
	}
	return nil
}
