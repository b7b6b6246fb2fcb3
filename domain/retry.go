package domain

import (
	"cmp"
	"math"
	"time"
)

// RetryPolicy decides when a failed ERP call is tried again: exponential
// backoff, capped, with full jitter, honouring Retry-After, bounded by a
// number of attempts and an age. The zero value means the defaults.
type RetryPolicy struct {
	// Initial is the upper bound of the first backoff. Default 1s.
	Initial time.Duration
	// Max caps every backoff (before Retry-After). Default 5m.
	Max time.Duration
	// Multiplier grows the bound per attempt. Default 2.
	Multiplier float64
	// MaxAttempts is the number of ERP attempts before giving up.
	// Default 8.
	MaxAttempts int
	// MaxAge gives up once the first attempt is older than this.
	// Default 24h.
	MaxAge time.Duration
	// MaxRetryAfter caps how long a Retry-After may postpone a retry.
	// Default 1h: an ERP asking for a week is a misconfiguration to alert on.
	MaxRetryAfter time.Duration
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	p.Initial = cmp.Or(p.Initial, time.Second)
	p.Max = cmp.Or(p.Max, 5*time.Minute)
	p.Multiplier = cmp.Or(p.Multiplier, 2)
	p.MaxAttempts = cmp.Or(p.MaxAttempts, 8)
	p.MaxAge = cmp.Or(p.MaxAge, 24*time.Hour)
	p.MaxRetryAfter = cmp.Or(p.MaxRetryAfter, time.Hour)
	if p.Max < p.Initial {
		p.Max = p.Initial
	}
	return p
}

// Bound is the upper bound of the backoff after failed attempt number
// attempt (1-based): min(Max, Initial × Multiplier^(attempt-1)).
func (p RetryPolicy) Bound(attempt int) time.Duration {
	p = p.withDefaults()
	if attempt < 1 {
		attempt = 1
	}
	b := float64(p.Initial) * math.Pow(p.Multiplier, float64(attempt-1))
	if b >= float64(p.Max) || math.IsInf(b, 0) || math.IsNaN(b) {
		return p.Max
	}
	return time.Duration(b)
}

// Backoff is the delay after failed attempt number attempt: full jitter,
// uniform in [0, Bound(attempt)] with r in [0,1), but never less than
// retryAfter (itself capped at MaxRetryAfter).
func (p RetryPolicy) Backoff(attempt int, retryAfter time.Duration, r float64) time.Duration {
	p = p.withDefaults()
	if r < 0 || r >= 1 {
		r = 0
	}
	d := time.Duration(r * float64(p.Bound(attempt)))
	retryAfter = min(retryAfter, p.MaxRetryAfter)
	return max(d, retryAfter)
}

// Exhausted reports whether no attempt may follow failed attempt number
// attempts, given when the first attempt was made.
func (p RetryPolicy) Exhausted(attempts int, firstAttempt, now time.Time) bool {
	p = p.withDefaults()
	return attempts >= p.MaxAttempts || (!firstAttempt.IsZero() && now.Sub(firstAttempt) >= p.MaxAge)
}

// MaxAttemptsOrDefault returns the effective MaxAttempts.
func (p RetryPolicy) MaxAttemptsOrDefault() int { return p.withDefaults().MaxAttempts }
