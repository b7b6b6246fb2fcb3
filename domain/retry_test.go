package domain_test

import (
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/dealbridge/dealbridge/domain"
)

func drawPolicy(t *rapid.T) domain.RetryPolicy {
	return domain.RetryPolicy{
		Initial:    time.Duration(rapid.Int64Range(int64(time.Millisecond), int64(10*time.Second)).Draw(t, "initial")),
		Max:        time.Duration(rapid.Int64Range(int64(time.Millisecond), int64(time.Hour)).Draw(t, "max")),
		Multiplier: rapid.Float64Range(1.1, 4).Draw(t, "multiplier"),
	}
}

// The bound grows with the attempt number and never passes the cap.
func TestBackoffBoundGrowsUpToCap(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := drawPolicy(t)
		capd := max(p.Max, p.Initial)
		prev := time.Duration(0)
		for a := 1; a <= 400; a++ {
			b := p.Bound(a)
			if b < prev {
				t.Fatalf("bound shrank at attempt %d: %v < %v", a, b, prev)
			}
			if b > capd {
				t.Fatalf("bound %v past cap %v at attempt %d", b, capd, a)
			}
			prev = b
		}
		if p.Bound(400) != capd {
			t.Fatalf("bound never reached the cap: %v vs %v", p.Bound(400), capd)
		}
	})
}

// Full jitter: the delay is within [0, bound], and spans it.
func TestBackoffJitterInBounds(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := drawPolicy(t)
		a := rapid.IntRange(1, 40).Draw(t, "attempt")
		r := rapid.Float64Range(0, 0.999999).Draw(t, "r")
		d := p.Backoff(a, 0, r)
		if d < 0 || d > p.Bound(a) {
			t.Fatalf("delay %v outside [0, %v]", d, p.Bound(a))
		}
		if lo := p.Backoff(a, 0, 0); lo != 0 {
			t.Fatalf("r=0 gives %v, want 0", lo)
		}
	})
}

// A Retry-After is never undercut (up to MaxRetryAfter).
func TestBackoffRespectsRetryAfter(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := drawPolicy(t)
		p.MaxRetryAfter = time.Hour
		a := rapid.IntRange(1, 40).Draw(t, "attempt")
		ra := time.Duration(rapid.Int64Range(0, int64(2*time.Hour)).Draw(t, "retry_after"))
		r := rapid.Float64Range(0, 0.999999).Draw(t, "r")
		d := p.Backoff(a, ra, r)
		if want := min(ra, time.Hour); d < want {
			t.Fatalf("delay %v undercuts Retry-After %v", d, want)
		}
		if d > max(p.Bound(a), min(ra, time.Hour)) {
			t.Fatalf("delay %v above both bound and Retry-After", d)
		}
	})
}

func TestExhausted(t *testing.T) {
	t.Parallel()
	p := domain.RetryPolicy{MaxAttempts: 3, MaxAge: time.Hour}
	now := time.Now()
	for _, tt := range []struct {
		attempts int
		first    time.Time
		want     bool
	}{
		{1, now, false}, {2, now.Add(-59 * time.Minute), false}, {3, now, true}, {1, now.Add(-time.Hour), true},
	} {
		if got := p.Exhausted(tt.attempts, tt.first, now); got != tt.want {
			t.Errorf("Exhausted(%d, %v) = %v, want %v", tt.attempts, now.Sub(tt.first), got, tt.want)
		}
	}
}
