package crashpoint

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

func TestParse(t *testing.T) {
	got := Parse(" a , b@3, c@x, d@0,")
	if len(got) != 2 || got["a"] != 1 || got["b"] != 3 {
		t.Fatalf("Parse = %v, want a@1 b@3", got)
	}
}

// TestHit re-runs this test binary with a crash point armed at its third
// hit: the child must die by SIGKILL after announcing it, having survived
// the first two hits and ignored an unarmed point.
func TestHit(t *testing.T) {
	if os.Getenv("CRASHPOINT_CHILD") == "1" {
		Hit("other")
		for i := range 3 {
			Hit("p")
			os.Stdout.WriteString("survived " + string(rune('1'+i)) + "\n")
		}
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHit$")
	cmd.Env = append(os.Environ(), "CRASHPOINT_CHILD=1", EnvVar+"=p@3")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("child: %v, want killed\n%s", err, out)
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, want SIGKILL\n%s", err, out)
	}
	s := string(out)
	if !strings.Contains(s, "survived 2") || strings.Contains(s, "survived 3") || !strings.Contains(s, "crashpoint p hit 3: SIGKILL") {
		t.Fatalf("child output:\n%s", s)
	}
}
