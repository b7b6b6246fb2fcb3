package cli_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/internal/cli"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// run runs the command line with env as the environment and returns the
// exit status and what it wrote.
func run(t *testing.T, env map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = cli.Run(t.Context(), args, cli.Env{
		Stdout: &out,
		Stderr: &errOut,
		Getenv: func(k string) string { return env[k] },
	})
	return code, out.String(), errOut.String()
}

// oneLine fails unless s is exactly one non-empty line.
func oneLine(t *testing.T, what, s string) string {
	t.Helper()
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) != 1 || lines[0] == "" {
		t.Fatalf("%s: want one line, got %q", what, s)
	}
	return lines[0]
}

var subcommands = []string{"dev", "api", "relay", "handler", "erp-sim", "migrate"}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"-h"}, {"--help"}} {
		code, out, errOut := run(t, nil, args...)
		if code != 0 {
			t.Errorf("%v: exit %d, want 0 (stderr %q)", args, code, errOut)
		}
		for _, c := range subcommands {
			if !strings.Contains(out, "  "+c+" ") {
				t.Errorf("%v: usage does not list %q:\n%s", args, c, out)
			}
		}
	}
	// No command at all is a usage mistake, but still shows the usage.
	code, out, _ := run(t, nil)
	if code != 2 || !strings.Contains(out, "Usage:") {
		t.Errorf("no arguments: exit %d, output %q; want 2 and the usage", code, out)
	}
}

func TestSubcommandHelpListsFlags(t *testing.T) {
	common := []string{"-database-url", "$DATABASE_URL", "-log-level", "-log-format"}
	handler := []string{"-erp-timeout", "-consumers", "-queue-poll-interval", "-lease", "-nack-delay"}
	relay := []string{"-relay-poll-interval", "-relay-batch-size", "-outbox-retention"}
	sim := []string{"-store", "-seed", "-error-rate", "-rate-limit-rate", "-latency", "-hang-rate", "-drop-after-commit-rate", "-down-until", "-reject-customer"}
	want := map[string][]string{
		"dev":     concat(common, relay, handler, sim, []string{"-listen", "-erp-sim-listen", "-data-dir", "-no-seed"}),
		"api":     concat(common, []string{"-listen", "$DEALBRIDGE_LISTEN"}),
		"relay":   concat(common, relay),
		"handler": concat(common, handler, []string{"-erp-url", "$DEALBRIDGE_ERP_URL"}),
		"erp-sim": concat(sim, []string{"-listen", "$DEALBRIDGE_ERP_SIM_LISTEN", "-log-level"}),
		"migrate": concat(common, []string{"up|down|status"}),
	}
	for _, c := range subcommands {
		t.Run(c, func(t *testing.T) {
			for _, help := range []string{"--help", "-h"} {
				code, out, errOut := run(t, nil, c, help)
				if code != 0 {
					t.Errorf("%s %s: exit %d, want 0", c, help, code)
				}
				all := out + errOut
				if !strings.Contains(all, "Usage: dealbridge "+c) {
					t.Errorf("%s %s: no usage line:\n%s", c, help, all)
				}
				for _, w := range want[c] {
					if !strings.Contains(all, w) {
						t.Errorf("%s %s: help does not mention %s:\n%s", c, help, w, all)
					}
				}
			}
		})
	}
}

func concat(parts ...[]string) []string {
	var out []string
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func TestUnknownCommand(t *testing.T) {
	code, _, errOut := run(t, nil, "frobnicate")
	if code != 2 {
		t.Errorf("exit %d, want 2", code)
	}
	if line := oneLine(t, "stderr", errOut); !strings.Contains(line, `"frobnicate"`) || !strings.Contains(line, "dealbridge help") {
		t.Errorf("stderr %q: want the unknown command named and a pointer to help", line)
	}
}

func TestMissingDatabaseURL(t *testing.T) {
	for _, c := range [][]string{{"api"}, {"relay"}, {"handler"}, {"migrate", "status"}} {
		code, out, errOut := run(t, nil, c...)
		if code != 2 {
			t.Errorf("%v without DATABASE_URL: exit %d, want 2", c, code)
		}
		if line := oneLine(t, strings.Join(c, " ")+" stderr", errOut); !strings.Contains(line, "DATABASE_URL") {
			t.Errorf("%v: stderr %q does not mention DATABASE_URL", c, line)
		}
		if out != "" {
			t.Errorf("%v: unexpected stdout %q", c, out)
		}
	}
}

func TestBadCommandLine(t *testing.T) {
	db := map[string]string{"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"}
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want string // in the last line of stderr
	}{
		{"unknown flag", nil, []string{"api", "--bogus"}, "-bogus"},
		{"flag without value", nil, []string{"api", "--listen"}, "-listen"},
		{"bad duration", nil, []string{"handler", "--erp-timeout", "soon"}, "-erp-timeout"},
		{"bad log level", db, []string{"api", "--log-level", "loud"}, "loud"},
		{"bad log format", db, []string{"relay", "--log-format", "xml"}, "xml"},
		{"migrate without action", db, []string{"migrate"}, "up, down, status"},
		{"migrate with two actions", db, []string{"migrate", "up", "down"}, "up, down, status"},
		{"bad sim fault plan", nil, []string{"erp-sim", "--down-until", "tomorrow"}, "down-until"},
		{"negative outbox retention", db, []string{"relay", "--outbox-retention", "-1h"}, "--outbox-retention"},
		{"negative outbox retention in dev", db, []string{"dev", "--outbox-retention", "-1h"}, "--outbox-retention"},
		{"negative bench rounds", nil, []string{"bench", "--rounds", "-1"}, "--rounds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := run(t, tc.env, tc.args...)
			if code != 2 {
				t.Errorf("%v: exit %d, want 2 (stderr %q)", tc.args, code, errOut)
			}
			lines := strings.Split(strings.TrimSpace(errOut), "\n")
			if last := lines[len(lines)-1]; !strings.HasPrefix(last, "dealbridge "+tc.args[0]+": ") || !strings.Contains(last, tc.want) {
				t.Errorf("%v: last stderr line %q: want \"dealbridge %s: …%s…\"", tc.args, last, tc.args[0], tc.want)
			}
		})
	}
}

func TestMigrateUnknownActionAgainstDatabase(t *testing.T) {
	env := map[string]string{"DATABASE_URL": pgtest.NewDatabase(t)}
	code, _, errOut := run(t, env, "migrate", "sideways")
	if code != 2 {
		t.Errorf("migrate sideways: exit %d, want 2", code)
	}
	if line := oneLine(t, "stderr", errOut); !strings.Contains(line, `"sideways"`) {
		t.Errorf("stderr %q does not name the action", line)
	}
}

func TestMigrate(t *testing.T) {
	env := map[string]string{"DATABASE_URL": pgtest.NewDatabase(t)}
	status := func() (applied, pending int) {
		t.Helper()
		code, out, errOut := run(t, env, "migrate", "status")
		if code != 0 {
			t.Fatalf("migrate status: exit %d: %s", code, errOut)
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			switch {
			case strings.Contains(l, " applied "):
				applied++
			case strings.Contains(l, " pending "):
				pending++
			default:
				t.Fatalf("migrate status: unexpected line %q", l)
			}
		}
		return applied, pending
	}
	step := func(action, wantOut string) {
		t.Helper()
		code, out, errOut := run(t, env, "migrate", action)
		if code != 0 {
			t.Fatalf("migrate %s: exit %d: %s", action, code, errOut)
		}
		if !strings.Contains(out, wantOut) {
			t.Errorf("migrate %s: stdout %q, want %q", action, out, wantOut)
		}
	}

	// pgtest's database is fully migrated.
	all, pending := status()
	if all < 4 || pending != 0 {
		t.Fatalf("fresh database: %d applied, %d pending; want all applied", all, pending)
	}
	step("up", "migrations applied") // nothing to do
	if a, p := status(); a != all || p != 0 {
		t.Errorf("after a no-op up: %d applied, %d pending; want %d and 0", a, p, all)
	}
	step("down", "rolled back one migration")
	if a, p := status(); a != all-1 || p != 1 {
		t.Errorf("after down: %d applied, %d pending; want %d and 1", a, p, all-1)
	}
	step("up", "migrations applied")
	if a, p := status(); a != all || p != 0 {
		t.Errorf("after up: %d applied, %d pending; want %d and 0", a, p, all)
	}

	// The flag works as well as the environment variable.
	code, _, errOut := run(t, nil, "migrate", "--database-url", env["DATABASE_URL"], "status")
	if code != 0 {
		t.Errorf("migrate --database-url … status: exit %d: %s", code, errOut)
	}
}

func TestUnreachableDatabaseIsOneLine(t *testing.T) {
	// Port 1 on loopback refuses connections at once.
	env := map[string]string{"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none?connect_timeout=5"}
	code, _, errOut := run(t, env, "migrate", "status")
	if code != 1 {
		t.Errorf("migrate status on an unreachable database: exit %d, want 1", code)
	}
	if line := oneLine(t, "stderr", errOut); !strings.Contains(line, "127.0.0.1:1") {
		t.Errorf("stderr %q does not say which database", line)
	}
}

func TestEnvironmentSetsDefaults(t *testing.T) {
	env := map[string]string{
		"DEALBRIDGE_LISTEN":         "127.0.0.1:9999",
		"DEALBRIDGE_ERP_SIM_LISTEN": "127.0.0.1:9998",
		"DEALBRIDGE_ERP_URL":        "http://erp.example:8069",
		"DEALBRIDGE_ERP_TIMEOUT":    "3s",
		"DEALBRIDGE_CONSUMERS":      "3",
		"DEALBRIDGE_DATA_DIR":       "/srv/dealbridge",
		"DEALBRIDGE_LOG_LEVEL":      "debug",
	}
	for _, tc := range []struct {
		cmd  string
		want []string
	}{
		{"api", []string{`(default "127.0.0.1:9999")`, `(default "debug")`}},
		{"handler", []string{`(default "http://erp.example:8069")`, "(default 3s)", "(default 3)"}},
		{"erp-sim", []string{`(default "127.0.0.1:9998")`}},
		{"dev", []string{`(default "127.0.0.1:9999")`, `(default "127.0.0.1:9998")`, `(default "/srv/dealbridge")`, "(default 3)"}},
	} {
		code, out, errOut := run(t, env, tc.cmd, "--help")
		if code != 0 {
			t.Errorf("%s --help: exit %d", tc.cmd, code)
		}
		for _, w := range tc.want {
			if !strings.Contains(out+errOut, w) {
				t.Errorf("%s --help with the environment set: no %s in\n%s", tc.cmd, w, out+errOut)
			}
		}
	}
	// Without the environment, the built-in defaults.
	_, out, errOut := run(t, nil, "api", "--help")
	if !strings.Contains(out+errOut, `(default "127.0.0.1:8080")`) {
		t.Errorf("api --help without the environment: no built-in default listen address in\n%s", out+errOut)
	}
}

func TestBadEnvironmentValue(t *testing.T) {
	// A typo in an environment variable must not silently fall back to the
	// default: it is a usage error, reported before anything connects to
	// the (here unreachable) database. --help still works.
	for _, tc := range []struct{ cmd, name, value string }{
		{"handler", "DEALBRIDGE_ERP_TIMEOUT", "10 seconds"},
		{"handler", "DEALBRIDGE_CONSUMERS", "eight"},
		{"handler", "DEALBRIDGE_CONSUMERS", "8 workers"},
		{"relay", "DEALBRIDGE_RELAY_POLL_INTERVAL", "fast"},
		{"relay", "DEALBRIDGE_RELAY_BATCH_SIZE", "1e3"},
	} {
		env := map[string]string{tc.name: tc.value, "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"}
		code, _, errOut := run(t, env, tc.cmd)
		if code != 2 {
			t.Errorf("%s with %s=%q: exit %d, want 2", tc.cmd, tc.name, tc.value, code)
		}
		if line := oneLine(t, tc.name+" stderr", errOut); !strings.Contains(line, tc.name) || !strings.Contains(line, tc.value) {
			t.Errorf("%s=%q: stderr %q does not name the variable and its value", tc.name, tc.value, line)
		}
		if code, _, _ := run(t, env, tc.cmd, "--help"); code != 0 {
			t.Errorf("%s --help with %s=%q: exit %d, want 0", tc.cmd, tc.name, tc.value, code)
		}
	}
}

// TestMigrateFlagsAfterAction: the usage line reads "migrate up|down|status
// [flags]", so flags after the action work as well as before it.
func TestMigrateFlagsAfterAction(t *testing.T) {
	url := pgtest.NewDatabase(t)
	for _, args := range [][]string{
		{"migrate", "up", "--database-url", url},
		{"migrate", "--database-url", url, "status"},
		{"migrate", "status", "--database-url", url, "--log-level", "warn"},
	} {
		if code, _, errOut := run(t, nil, args...); code != 0 {
			t.Errorf("%q: exit %d: %s", args, code, errOut)
		}
	}
	if code, _, _ := run(t, nil, "migrate", "up", "--database-url", url, "down"); code != 2 {
		t.Errorf("migrate with an action on each side of the flags: exit %d, want 2", code)
	}
}
