package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// child is a child process of the bench: a dealbridge subcommand.
type child struct {
	name    string // relay, handler-1, erp-sim, river-worker, …
	appName string // its pool's application_name ("" when it has no pool)
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	waitErr error
	cpu0    time.Duration
}

// childEnv is this process's environment without dealbridge settings: a
// child is configured by its flags alone.
func childEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "DATABASE_URL=") || strings.HasPrefix(kv, "DEALBRIDGE_")
	})
}

// start runs `bin args...` with its output in logDir/<prefix>-<name>.log.
func startChild(bin, logDir, prefix, name, appName string, args ...string) (*child, error) {
	logPath := filepath.Join(logDir, prefix+"-"+name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("bench: log of %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = childEnv()
	cmd.Stdout, cmd.Stderr = f, f
	// Die with the bench, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("bench: start %s: %w", name, err)
	}
	c := &child{name: name, appName: appName, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		c.waitErr = cmd.Wait()
		f.Close()
		close(c.done)
	}()
	return c, nil
}

// cpu is the CPU time the child has used so far.
func (c *child) cpu() time.Duration {
	st, err := readStat(c.cmd.Process.Pid)
	if err != nil {
		return 0
	}
	return st.self
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits for the exit (after 20s SIGQUIT, for a
// goroutine dump, then SIGKILL). A child
// that had exited by itself, or exits non-zero, is an error.
func (c *child) stop() error {
	if c.exited() {
		return fmt.Errorf("%s exited early: %v (log %s)", c.name, c.waitErr, c.logPath)
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		// SIGQUIT makes a Go child write every goroutine's stack to its
		// log before it exits: the evidence of what it was stuck on.
		_ = c.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-c.done:
		case <-time.After(3 * time.Second):
			_ = c.cmd.Process.Kill()
			<-c.done
		}
		return fmt.Errorf("%s did not stop within 20s of SIGTERM; goroutine dump (SIGQUIT) in its log %s", c.name, c.logPath)
	}
	if c.waitErr != nil {
		return fmt.Errorf("%s: %w (log %s)", c.name, c.waitErr, c.logPath)
	}
	return nil
}

// peakRSS is the child's peak resident set size in bytes, known once it
// has exited (getrusage's ru_maxrss, as wait4 reports it).
func (c *child) peakRSS() int64 {
	if c.cmd.ProcessState == nil {
		return 0
	}
	if ru, ok := c.cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		return ru.Maxrss * 1024 // kilobytes on Linux
	}
	return 0
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// waitReady waits until every child with a pool has connected (its
// application_name shows in pg_stat_activity), the ERP simulator answers,
// and no child has exited.
func waitReady(ctx context.Context, pool *pgxpool.Pool, erpURL string, children []*child) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	want := map[string]int{}
	for _, c := range children {
		if c.appName != "" {
			want[c.appName]++
		}
	}
	client := &http.Client{Timeout: time.Second}
	for {
		for _, c := range children {
			if c.exited() {
				return fmt.Errorf("%s exited at start: %v (log %s)", c.name, c.waitErr, c.logPath)
			}
		}
		ready := true
		if resp, err := client.Get(erpURL + "/_sim/stats"); err == nil {
			resp.Body.Close()
			ready = resp.StatusCode == http.StatusOK
		} else {
			ready = false
		}
		for app, n := range want {
			var got int
			// Every process opens at least one connection under its
			// application_name (the warm-up then proves them all working).
			if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1`, app).Scan(&got); err != nil {
				return err
			}
			if got < n {
				ready = false
			}
		}
		if ready {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.New("bench: the child processes did not get ready within 30s")
		case <-time.After(50 * time.Millisecond):
		}
	}
}
