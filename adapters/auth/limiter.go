package auth

import (
	"sync"
	"time"
)

// limiter is a set of token buckets keyed by client address and user name,
// in the memory of one process (a login hits one process; several api
// processes each allow their own burst, which still bounds guessing).
type limiter struct {
	mu      sync.Mutex
	burst   float64
	refill  time.Duration // one token per refill
	buckets map[string]*bucket
	now     func() time.Time
}

type bucket struct {
	tokens float64
	at     time.Time
}

func newLimiter(burst int, refill time.Duration) *limiter {
	return &limiter{burst: float64(burst), refill: refill, buckets: map[string]*bucket{}, now: time.Now}
}

// take spends one token from each key's bucket when every bucket has one,
// and returns 0; otherwise it spends nothing and returns how long until the
// emptiest bucket has a token again.
func (l *limiter) take(keys ...string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if len(l.buckets) > 10000 {
		for k, b := range l.buckets {
			if now.Sub(b.at) > time.Duration(l.burst)*l.refill {
				delete(l.buckets, k)
			}
		}
	}
	var wait time.Duration
	bs := make([]*bucket, len(keys))
	for i, k := range keys {
		b, ok := l.buckets[k]
		if !ok {
			b = &bucket{tokens: l.burst, at: now}
			l.buckets[k] = b
		}
		b.tokens = min(l.burst, b.tokens+float64(now.Sub(b.at))/float64(l.refill))
		b.at = now
		if b.tokens < 1 {
			wait = max(wait, time.Duration((1-b.tokens)*float64(l.refill)))
		}
		bs[i] = b
	}
	if wait > 0 {
		return wait
	}
	for _, b := range bs {
		b.tokens--
	}
	return 0
}

// forget refills a key's bucket (a successful login clears its user's
// failures, not its address's).
func (l *limiter) forget(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.buckets, key)
}
