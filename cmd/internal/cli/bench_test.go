package cli_test

import (
	"strings"
	"testing"
)

// TestBenchUsageErrors: a bad bench command line is a usage error (exit 2)
// naming the flag, before anything is started. (The bench itself runs in
// cmd/internal/bench's TestQuickRun.)
func TestBenchUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bench", "--rates", "250,fast"}, "--rates"},
		{[]string{"bench", "--handlers", "x"}, "--handlers"},
		{[]string{"bench", "--pg-setting", "fsync"}, "--pg-setting"},
		{[]string{"bench", "extra"}, "unexpected argument"},
		{[]string{"bench", "--no-such-flag"}, "no-such-flag"},
	} {
		code, _, stderr := run(t, nil, tc.args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
}
