package chaos

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/dealbridge/dealbridge/adapters/crashpoint"
)

// proc is one supervised dealbridge OS process: it is restarted whenever it
// exits until stop is called, like a process manager (systemd,
// Kubernetes) would. Its stdout and stderr go to one log file, appended
// across incarnations.
type proc struct {
	name    string
	bin     string
	args    []string
	env     []string
	logPath string
	logf    func(string, ...any)
	// onStart runs after every (re)start, e.g. to re-apply the ERP fault
	// plan to a restarted erp-sim.
	onStart func()

	mu       sync.Mutex
	cmd      *exec.Cmd
	exited   chan struct{}
	armNext  string // DEALBRIDGE_CRASHPOINT of the next incarnation
	starts   int
	kills    int // SIGKILLs sent by the nemesis
	stopping bool
	stopped  chan struct{}
	cleanRC  int // exit status of the final graceful stop
}

func newProc(name, bin, logPath string, env []string, logf func(string, ...any), args ...string) *proc {
	return &proc{name: name, bin: bin, args: args, env: env, logPath: logPath, logf: logf, stopped: make(chan struct{}), cleanRC: -2}
}

// baseEnv is this process's environment without dealbridge settings.
func baseEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "DATABASE_URL=") || strings.HasPrefix(kv, "DEALBRIDGE_")
	})
}

func (p *proc) startLocked() error {
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = append(append(baseEnv(), p.env...), "DEALBRIDGE_LOG_LEVEL=warn")
	if p.armNext != "" {
		cmd.Env = append(cmd.Env, crashpoint.EnvVar+"="+p.armNext)
		fmt.Fprintf(f, "---- chaos: starting %s armed with %s\n", p.name, p.armNext)
		p.armNext = ""
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Die with the harness, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return err
	}
	p.cmd = cmd
	p.starts++
	done := make(chan struct{})
	p.exited = done
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(done)
	}()
	return nil
}

// supervise keeps the process running until stop.
func (p *proc) supervise() {
	defer close(p.stopped)
	for {
		p.mu.Lock()
		if p.stopping {
			p.mu.Unlock()
			return
		}
		err := p.startLocked()
		done := p.exited
		p.mu.Unlock()
		if err != nil {
			p.logf("chaos: start %s: %v", p.name, err)
			time.Sleep(500 * time.Millisecond)
			continue
		}
		if p.onStart != nil {
			go p.onStart()
		}
		<-done
		p.mu.Lock()
		stopping := p.stopping
		if stopping {
			p.cleanRC = p.cmd.ProcessState.ExitCode()
		}
		p.mu.Unlock()
		if stopping {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// kill sends SIGKILL to the current incarnation (the supervisor restarts
// it); armed, when not empty, arms the next incarnation's crash point.
func (p *proc) kill(armed string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.armNext = armed
	if p.cmd != nil && p.cmd.Process != nil {
		select {
		case <-p.exited:
		default:
			p.kills++
			_ = p.cmd.Process.Kill()
		}
	}
}

// stop ends supervision: SIGTERM, then SIGKILL after timeout. It returns
// the exit status of the graceful stop (-1 when it had to be killed).
func (p *proc) stop(timeout time.Duration) int {
	p.mu.Lock()
	p.stopping = true
	cmd, done := p.cmd, p.exited
	p.mu.Unlock()
	if cmd != nil {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(timeout):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	select {
	case <-p.stopped:
	case <-time.After(5 * time.Second):
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cleanRC
}

// runOnce runs `bin args...` to completion.
func runOnce(ctx context.Context, bin string, env []string, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(baseEnv(), env...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("dealbridge %s: timed out after %v", strings.Join(args, " "), timeout)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), fmt.Errorf("dealbridge %s: exit status %d", strings.Join(args, " "), ee.ExitCode())
	}
	return string(out), err
}
