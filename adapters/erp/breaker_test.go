package erp_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/domain"
)

// fakeClock is an injectable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestBreakerAgainstSim drives the breaker through closed → open →
// half-open → closed against the simulator, counting the hits it receives.
func TestBreakerAgainstSim(t *testing.T) {
	sim, ts := startSim(t, erpsim.Config{Faults: erpsim.Faults{ErrorRate: 1}})
	clock := newFakeClock()
	b := erp.NewBreaker(newClient(ts.URL, 5*time.Second), erp.BreakerConfig{
		FailureThreshold: 3, CoolDown: 2 * time.Second, Now: clock.Now,
	})
	ctx := t.Context()

	for i := range 3 {
		if b.State() != erp.StateClosed {
			t.Fatalf("call %d: state %s, want closed", i, b.State())
		}
		_, err := b.CreateInvoice(ctx, request("K-1"))
		if errors.Is(err, erp.ErrBreakerOpen) {
			t.Fatalf("call %d failed fast", i)
		}
		erpErr(t, err, domain.ErrorTransient)
	}
	if b.State() != erp.StateOpen || !b.OpenUntil().Equal(clock.Now().Add(2*time.Second)) {
		t.Fatalf("state %s until %v", b.State(), b.OpenUntil())
	}

	// Open: fail fast, the ERP sees nothing.
	for range 10 {
		_, err := b.CreateInvoice(ctx, request("K-1"))
		e := erpErr(t, err, domain.ErrorTransient)
		if !errors.Is(err, erp.ErrBreakerOpen) || e.RetryAfter != 2*time.Second {
			t.Fatalf("open breaker returned %v (RetryAfter %v)", err, e.RetryAfter)
		}
		if _, _, err := b.FindInvoiceByKey(ctx, "K-1"); !errors.Is(err, erp.ErrBreakerOpen) {
			t.Fatalf("open breaker let a lookup through: %v", err)
		}
	}
	if got := sim.Stats().Attempts; got != 3 {
		t.Fatalf("server hits = %d, want 3", got)
	}

	// The ERP heals (through the simulator's runtime fault API).
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, ts.URL+"/_sim/faults", bytes.NewReader([]byte(`{"error_rate":0}`)))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT /_sim/faults: %v %v", resp, err)
	}
	resp.Body.Close()

	clock.Advance(2 * time.Second)
	if b.State() != erp.StateHalfOpen {
		t.Fatalf("state %s, want half-open", b.State())
	}
	inv, err := b.CreateInvoice(ctx, request("K-1"))
	if err != nil || inv.Number != "INV-000001" {
		t.Fatalf("probe = %+v, %v", inv, err)
	}
	if b.State() != erp.StateClosed || !b.OpenUntil().IsZero() {
		t.Fatalf("state %s until %v after a successful probe", b.State(), b.OpenUntil())
	}
	if got := sim.Stats().Attempts; got != 4 {
		t.Fatalf("server hits = %d, want 4", got)
	}
}

// fakePort returns scripted errors and counts calls.
type fakePort struct {
	calls atomic.Int64
	err   atomic.Pointer[error]
	block chan struct{} // when non-nil, calls wait on it
}

func (p *fakePort) setErr(err error) { p.err.Store(&err) }

func (p *fakePort) result() error {
	p.calls.Add(1)
	if p.block != nil {
		<-p.block
	}
	if e := p.err.Load(); e != nil {
		return *e
	}
	return nil
}

func (p *fakePort) CreateInvoice(context.Context, erp.InvoiceRequest) (erp.Invoice, error) {
	if err := p.result(); err != nil {
		return erp.Invoice{}, err
	}
	return erp.Invoice{Number: "INV-1"}, nil
}

func (p *fakePort) FindInvoiceByKey(context.Context, string) (erp.Invoice, bool, error) {
	err := p.result()
	return erp.Invoice{}, false, err
}

func classErr(c domain.ErrorClass) error { return &domain.ERPError{Class: c, Message: "scripted"} }

func TestBreakerCountsOnlyAvailabilityFailures(t *testing.T) {
	p := &fakePort{}
	b := erp.NewBreaker(p, erp.BreakerConfig{FailureThreshold: 3, Now: newFakeClock().Now})
	ctx := t.Context()

	p.setErr(classErr(domain.ErrorPermanent))
	for range 10 {
		_, _ = b.CreateInvoice(ctx, request("K"))
	}
	if b.State() != erp.StateClosed {
		t.Fatal("permanent errors opened the breaker")
	}

	// Two failures, a permanent answer (the ERP is up) resets the count.
	p.setErr(classErr(domain.ErrorAmbiguous))
	_, _ = b.CreateInvoice(ctx, request("K"))
	p.setErr(classErr(domain.ErrorRateLimited))
	_, _ = b.CreateInvoice(ctx, request("K"))
	p.setErr(classErr(domain.ErrorPermanent))
	_, _ = b.CreateInvoice(ctx, request("K"))
	p.setErr(classErr(domain.ErrorTransient))
	_, _ = b.CreateInvoice(ctx, request("K"))
	_, _ = b.CreateInvoice(ctx, request("K"))
	if b.State() != erp.StateClosed {
		t.Fatal("count was not reset by a permanent answer")
	}

	// Calls abandoned by the caller count for nothing.
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	for range 5 {
		_, _ = b.CreateInvoice(canceled, request("K"))
	}
	if b.State() != erp.StateClosed {
		t.Fatal("caller cancellations opened the breaker")
	}

	// Non-ERPError errors count as transient failures (domain.ClassOf).
	p.setErr(errors.New("opaque"))
	_, _ = b.CreateInvoice(ctx, request("K"))
	if b.State() != erp.StateOpen {
		t.Fatalf("state %s after 3 consecutive failures, want open", b.State())
	}
}

func TestBreakerCoolDownDoublesUpToMax(t *testing.T) {
	clock := newFakeClock()
	p := &fakePort{}
	p.setErr(classErr(domain.ErrorTransient))
	b := erp.NewBreaker(p, erp.BreakerConfig{FailureThreshold: 1, CoolDown: time.Second, MaxCoolDown: 5 * time.Second, Now: clock.Now})
	ctx := t.Context()

	_, _ = b.CreateInvoice(ctx, request("K"))
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}
	for i, d := range want {
		if got := b.OpenUntil().Sub(clock.Now()); got != d {
			t.Fatalf("round %d: cool-down %v, want %v", i, got, d)
		}
		before := p.calls.Load()
		clock.Advance(d - time.Millisecond)
		if _, err := b.CreateInvoice(ctx, request("K")); !errors.Is(err, erp.ErrBreakerOpen) || p.calls.Load() != before {
			t.Fatalf("round %d: call before the cool-down ended reached the ERP (%v)", i, err)
		}
		clock.Advance(time.Millisecond)
		_, _ = b.CreateInvoice(ctx, request("K")) // failing probe
		if p.calls.Load() != before+1 {
			t.Fatalf("round %d: probe did not reach the ERP", i)
		}
	}

	// A successful probe closes and resets the cool-down.
	clock.Advance(5 * time.Second)
	p.setErr(nil)
	if _, err := b.CreateInvoice(ctx, request("K")); err != nil {
		t.Fatal(err)
	}
	p.setErr(classErr(domain.ErrorTransient))
	_, _ = b.CreateInvoice(ctx, request("K"))
	if got := b.OpenUntil().Sub(clock.Now()); got != time.Second {
		t.Fatalf("cool-down after close = %v, want the base 1s", got)
	}
}

func TestBreakerHalfOpenAdmitsOneProbe(t *testing.T) {
	clock := newFakeClock()
	p := &fakePort{}
	p.setErr(classErr(domain.ErrorTransient))
	b := erp.NewBreaker(p, erp.BreakerConfig{FailureThreshold: 1, CoolDown: time.Second, Now: clock.Now})
	ctx := t.Context()
	_, _ = b.CreateInvoice(ctx, request("K"))
	clock.Advance(time.Second)

	p.block = make(chan struct{})
	p.setErr(nil)
	probeDone := make(chan error)
	go func() {
		_, err := b.CreateInvoice(ctx, request("K"))
		probeDone <- err
	}()
	for p.calls.Load() != 2 {
		time.Sleep(time.Millisecond)
	}
	if b.State() != erp.StateHalfOpen {
		t.Fatalf("state %s while probing, want half-open", b.State())
	}
	for range 5 {
		if _, _, err := b.FindInvoiceByKey(ctx, "K"); !errors.Is(err, erp.ErrBreakerOpen) {
			t.Fatalf("second call during the probe was let through: %v", err)
		}
	}
	close(p.block)
	if err := <-probeDone; err != nil {
		t.Fatal(err)
	}
	if b.State() != erp.StateClosed || p.calls.Load() != 2 {
		t.Fatalf("state %s, calls %d", b.State(), p.calls.Load())
	}
}
