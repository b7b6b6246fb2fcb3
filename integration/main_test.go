// Package integration runs dealbridge as its users do: the real binary as
// separate OS processes, a real PostgreSQL and real HTTP between them.
//
// TestMain builds cmd/dealbridge once per test binary (with -race when the
// tests themselves run with -race, so that a data race in any subprocess
// fails its test through the exit status 66 it causes) and then hands over
// to pgtest.Main for the test databases.
package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

// dealbridgeBin is the path of the binary TestMain built.
var dealbridgeBin string

// reaperStdin is the write end of the pipe that keeps the reaper waiting;
// held here so that it stays open until the test binary exits.
var reaperStdin *os.File

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "dealbridge-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		os.Exit(1)
	}
	if err := buildBinary(dir); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		_ = os.RemoveAll(dir)
		os.Exit(1)
	}
	// pgtest.Main ends with os.Exit, so no defer of ours would run: a
	// small reaper process removes dir once this process has exited, for
	// whatever reason (it reads its stdin until the write end, held only by
	// this process, closes).
	if err := removeAfterExit(dir); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		_ = os.RemoveAll(dir)
		os.Exit(1)
	}
	pgtest.Main(m)
}

// buildBinary builds cmd/dealbridge into dir and sets dealbridgeBin.
func buildBinary(dir string) error {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return errors.New("go env GOMOD: not inside the dealbridge module")
	}
	bin := filepath.Join(dir, "dealbridge")
	args := []string{"build"}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "-o", bin, "./cmd/dealbridge")
	cmd := exec.Command("go", args...)
	cmd.Dir = filepath.Dir(gomod)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	dealbridgeBin = bin
	return nil
}

func removeAfterExit(dir string) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("reaper pipe: %w", err)
	}
	cmd := exec.Command("/bin/sh", "-c", `cat >/dev/null; rm -rf "$1"`, "reaper", dir)
	cmd.Stdin = r
	// Its own process group: an interrupt of the test run must not stop
	// it before it has cleaned up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return fmt.Errorf("start reaper: %w", err)
	}
	r.Close()
	reaperStdin = w
	go func() { _ = cmd.Wait() }()
	return nil
}

// syncBuffer is a bytes.Buffer safe for a writing process and a reading test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// proc is a dealbridge subprocess.
type proc struct {
	t      testing.TB
	name   string
	cmd    *exec.Cmd
	stdout syncBuffer
	stderr syncBuffer
	done   chan struct{} // closed when the process has exited
	err    error         // cmd.Wait's result; read only after done

	mu      sync.Mutex
	stopped bool // the test stopped, killed or waited for it: cleanup leaves it alone
}

// startProc starts `dealbridge args...` with the environment of the test
// minus any dealbridge configuration, plus env ("NAME=value"). At cleanup a
// process still running is stopped with SIGTERM and must exit 0 (SIGKILL
// after stopTimeout); when the test failed, its output is logged.
func startProc(t testing.TB, name string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, done: make(chan struct{})}
	p.cmd = exec.Command(dealbridgeBin, args...)
	p.cmd.Env = append(baseEnv(), env...)
	p.cmd.Stdout = &p.stdout
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.mu.Lock()
		stopped := p.stopped
		p.mu.Unlock()
		if !stopped {
			if code := p.stop(stopTimeout); code != 0 {
				t.Errorf("%s: exit status %d after SIGTERM, want 0", name, code)
			}
		}
		if strings.Contains(p.stderr.String(), "WARNING: DATA RACE") {
			t.Errorf("%s: the race detector found a data race", name)
		}
		if t.Failed() {
			p.logOutput()
		}
	})
	return p
}

// stopTimeout bounds a graceful shutdown: the handler's router allows its
// handlers 15s to finish.
const stopTimeout = 20 * time.Second

// baseEnv is the test's environment without settings that would change
// what a dealbridge process does.
func baseEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "DATABASE_URL=") || strings.HasPrefix(kv, "DEALBRIDGE_")
	})
}

func (p *proc) logOutput() {
	// The start (startup errors) and the end (the failure, the shutdown).
	const head, tail = 2 << 10, 8 << 10
	cut := func(s string) string {
		if len(s) <= head+tail {
			return s
		}
		return s[:head] + "\n[… " + strconv.Itoa(len(s)-head-tail) + " bytes …]\n" + s[len(s)-tail:]
	}
	p.t.Logf("---- %s (%s) stdout:\n%s", p.name, strings.Join(p.cmd.Args, " "), cut(p.stdout.String()))
	p.t.Logf("---- %s stderr:\n%s", p.name, cut(p.stderr.String()))
}

// exited reports whether the process has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitCode is the exit status after done: -1 when killed by a signal.
func (p *proc) exitCode() int {
	<-p.done
	if p.err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// wait waits up to timeout for the process to exit on its own and returns
// its exit status; it fails the test when the process is still running.
func (p *proc) wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
		p.markStopped()
		return p.exitCode()
	case <-time.After(timeout):
		p.t.Fatalf("%s still running after %v", p.name, timeout)
		return 0
	}
}

func (p *proc) markStopped() {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
}

// signal sends sig and waits up to timeout for the process to exit. It
// returns the exit status, or -1 when the process had to be killed.
func (p *proc) signal(sig os.Signal, timeout time.Duration) int {
	p.markStopped()
	if p.exited() {
		return p.exitCode()
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		p.t.Errorf("%s: send %v: %v", p.name, sig, err)
	}
	select {
	case <-p.done:
		return p.exitCode()
	case <-time.After(timeout):
		p.t.Errorf("%s did not exit within %v of %v; killing it", p.name, timeout, sig)
		p.kill()
		return -1
	}
}

// stop sends SIGTERM, then SIGKILL after timeout; see signal.
func (p *proc) stop(timeout time.Duration) int { return p.signal(syscall.SIGTERM, timeout) }

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() {
	p.markStopped()
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		p.t.Errorf("%s: kill: %v", p.name, err)
	}
	<-p.done
}

// waitFor polls cond until it reports true, the process exits, or timeout
// passes; the last two fail the test (and cleanup then logs the output).
func (p *proc) waitFor(timeout time.Duration, what string, cond func() (bool, error)) {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for {
		ok, err := cond()
		if ok {
			return
		}
		lastErr = err
		if p.exited() {
			p.t.Fatalf("%s exited (status %d) while waiting for %s", p.name, p.exitCode(), what)
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s: no %s within %v (last error: %v)", p.name, what, timeout, lastErr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitHealthy waits until GET baseURL/healthz answers 200.
func (p *proc) waitHealthy(baseURL string, timeout time.Duration) {
	p.t.Helper()
	client := &http.Client{Timeout: time.Second}
	p.waitFor(timeout, "healthy "+baseURL+"/healthz", func() (bool, error) {
		resp, err := client.Get(baseURL + "/healthz")
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, fmt.Errorf("status %s", resp.Status)
	})
}

// waitStderr waits until the process has written substr to stderr.
func (p *proc) waitStderr(substr string, timeout time.Duration) {
	p.t.Helper()
	p.waitFor(timeout, fmt.Sprintf("%q on stderr", substr), func() (bool, error) {
		return strings.Contains(p.stderr.String(), substr), nil
	})
}

// runProc runs `dealbridge args...` to completion (at most timeout) and
// returns its exit status, stdout and stderr.
func runProc(t testing.TB, timeout time.Duration, env []string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, dealbridgeBin, args...)
	cmd.Env = append(baseEnv(), env...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("dealbridge %s: still running after %v\nstderr:\n%s", strings.Join(args, " "), timeout, stderr.String())
	}
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("dealbridge %s: %v", strings.Join(args, " "), err)
		}
		code = ee.ExitCode()
	}
	return code, stdout.String(), stderr.String()
}

// freeAddr returns a loopback address with a port that was free a moment
// ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// eventually polls cond until it reports true or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v (last error: %v)", what, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
