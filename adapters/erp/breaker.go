package erp

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/dealbridge/dealbridge/domain"
)

// ErrBreakerOpen is wrapped by the *domain.ERPError (class transient) that a
// Breaker returns, without calling the ERP, while it is open or while its
// half-open probe is in flight. Test for it with errors.Is.
var ErrBreakerOpen = errors.New("erp circuit breaker open")

// Breaker states as reported by (*Breaker).State.
const (
	StateClosed   = "closed"
	StateOpen     = "open"
	StateHalfOpen = "half-open"
)

// BreakerConfig configures a Breaker. Zero values take the defaults.
type BreakerConfig struct {
	// FailureThreshold is the number of consecutive failures that opens the
	// breaker. Default 5.
	FailureThreshold int
	// CoolDown is how long the breaker stays open the first time. Default 5s.
	CoolDown time.Duration
	// MaxCoolDown caps the cool-down, which doubles each time a half-open
	// probe fails. Default 1m (never below CoolDown).
	MaxCoolDown time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger receives state changes. Default: discard.
	Logger *slog.Logger
}

// Breaker is a circuit breaker around a Port. It is safe for concurrent use.
//
// Guarantees:
//   - Closed: calls pass through. FailureThreshold consecutive failures open
//     it. A failure is an error of class transient, ambiguous or
//     rate_limited; a success or a permanent error (the ERP answered, so it
//     is up) resets the count. A call abandoned by the caller
//     (context.Canceled on the caller's context) counts as neither.
//   - Open: every call returns at once a *domain.ERPError{Class: transient}
//     wrapping ErrBreakerOpen, with RetryAfter set to the remaining
//     cool-down, and the wrapped Port is not called.
//   - Half-open (the cool-down has elapsed): exactly one call at a time is let
//     through as a probe; concurrent calls fail fast as when open. A probe
//     success (or permanent error) closes the breaker and resets the
//     cool-down; a probe failure reopens it with the cool-down doubled, up
//     to MaxCoolDown.
//
// Both Port methods go through the breaker: they reach the same ERP.
type Breaker struct {
	port      Port
	threshold int
	base, max time.Duration
	now       func() time.Time
	log       *slog.Logger

	mu        sync.Mutex
	failures  int       // consecutive failures while closed
	openUntil time.Time // zero when closed
	coolDown  time.Duration
	probing   bool // a half-open probe is in flight
}

var _ Port = (*Breaker)(nil)

// NewBreaker wraps port in a circuit breaker configured by cfg.
func NewBreaker(port Port, cfg BreakerConfig) *Breaker {
	if cfg.FailureThreshold <= 0 {
		cfg.FailureThreshold = 5
	}
	if cfg.CoolDown <= 0 {
		cfg.CoolDown = 5 * time.Second
	}
	if cfg.MaxCoolDown <= 0 {
		cfg.MaxCoolDown = time.Minute
	}
	cfg.MaxCoolDown = max(cfg.MaxCoolDown, cfg.CoolDown)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Breaker{
		port: port, threshold: cfg.FailureThreshold, base: cfg.CoolDown, max: cfg.MaxCoolDown,
		now: cfg.Now, log: cfg.Logger, coolDown: cfg.CoolDown,
	}
}

// CreateInvoice calls the wrapped Port unless the breaker is open.
func (b *Breaker) CreateInvoice(ctx context.Context, req InvoiceRequest) (Invoice, error) {
	probe, err := b.admit()
	if err != nil {
		return Invoice{}, err
	}
	inv, err := b.port.CreateInvoice(ctx, req)
	b.record(ctx, probe, err)
	return inv, err
}

// FindInvoiceByKey calls the wrapped Port unless the breaker is open.
func (b *Breaker) FindInvoiceByKey(ctx context.Context, key string) (Invoice, bool, error) {
	probe, err := b.admit()
	if err != nil {
		return Invoice{}, false, err
	}
	inv, ok, err := b.port.FindInvoiceByKey(ctx, key)
	b.record(ctx, probe, err)
	return inv, ok, err
}

// State returns "closed", "open" or "half-open". An open breaker whose
// cool-down has elapsed reports "half-open".
func (b *Breaker) State() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.openUntil.IsZero():
		return StateClosed
	case b.probing || !b.now().Before(b.openUntil):
		return StateHalfOpen
	default:
		return StateOpen
	}
}

// OpenUntil returns the end of the current cool-down, or the zero time when
// the breaker is closed. After it passes the breaker is half-open.
func (b *Breaker) OpenUntil() time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.openUntil
}

// admit decides whether a call may proceed, and whether it is the half-open
// probe.
func (b *Breaker) admit() (probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.openUntil.IsZero() {
		return false, nil
	}
	now := b.now()
	if b.probing || now.Before(b.openUntil) {
		return false, &domain.ERPError{
			Class:      domain.ErrorTransient,
			RetryAfter: max(b.openUntil.Sub(now), 0),
			Message:    "circuit breaker open",
			Err:        ErrBreakerOpen,
		}
	}
	b.probing = true
	b.log.Info("erp circuit breaker half-open: probing")
	return true, nil
}

// record feeds a call's outcome into the state machine.
func (b *Breaker) record(ctx context.Context, probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if probe {
		b.probing = false
	}
	if err != nil && errors.Is(ctx.Err(), context.Canceled) {
		return // the caller gave up; says nothing about the ERP
	}
	if err == nil || domain.ClassOf(err) == domain.ErrorPermanent {
		if !b.openUntil.IsZero() {
			b.log.Info("erp circuit breaker closed")
		}
		b.failures, b.openUntil, b.coolDown = 0, time.Time{}, b.base
		return
	}
	if probe {
		b.coolDown = min(2*b.coolDown, b.max)
		b.trip(err)
		return
	}
	if !b.openUntil.IsZero() {
		return // a call admitted before the breaker opened; already open
	}
	b.failures++
	if b.failures >= b.threshold {
		b.trip(err)
	}
}

func (b *Breaker) trip(err error) {
	b.openUntil = b.now().Add(b.coolDown)
	b.failures = 0
	b.log.Warn("erp circuit breaker open", "cool_down", b.coolDown, "open_until", b.openUntil, "last_err", err)
}
