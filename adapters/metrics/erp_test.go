package metrics_test

import (
	"context"
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/metrics"
	"github.com/dealbridge/dealbridge/domain"
)

// fakePort answers with the errors queued in errs, then succeeds.
type fakePort struct {
	errs  []error
	found bool
}

func (p *fakePort) next() error {
	if len(p.errs) == 0 {
		return nil
	}
	err := p.errs[0]
	p.errs = p.errs[1:]
	return err
}

func (p *fakePort) CreateInvoice(ctx context.Context, req erp.InvoiceRequest) (erp.Invoice, error) {
	return erp.Invoice{Key: req.Key}, p.next()
}

func (p *fakePort) FindInvoiceByKey(ctx context.Context, key string) (erp.Invoice, bool, error) {
	err := p.next()
	return erp.Invoice{}, err == nil && p.found, err
}

func gathered(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

func TestERPMetricsCountCallsByOutcome(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m, err := metrics.NewERPMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakePort{errs: []error{
		&domain.ERPError{Class: domain.ErrorTransient, StatusCode: 503},
		&domain.ERPError{Class: domain.ErrorRateLimited, StatusCode: 429},
		&domain.ERPError{Class: domain.ErrorPermanent, StatusCode: 422},
		&domain.ERPError{Class: domain.ErrorAmbiguous, Err: context.Canceled},
		nil,
	}}
	port := m.Instrument(fake)
	ctx := context.Background()
	for range 5 {
		_, _ = port.CreateInvoice(ctx, erp.InvoiceRequest{Key: "d:2"})
	}
	if _, ok, err := port.FindInvoiceByKey(ctx, "d:2"); ok || err != nil {
		t.Fatalf("FindInvoiceByKey = %v, %v", ok, err)
	}
	fake.found = true
	_, _, _ = port.FindInvoiceByKey(ctx, "d:2")

	mfs := gathered(t, reg)
	for _, c := range []struct {
		op, outcome string
		want        float64
	}{
		{metrics.OperationCreateInvoice, "transient", 1},
		{metrics.OperationCreateInvoice, "rate_limited", 1},
		{metrics.OperationCreateInvoice, "permanent", 1},
		{metrics.OperationCreateInvoice, metrics.OutcomeCanceled, 1},
		{metrics.OperationCreateInvoice, metrics.OutcomeOK, 1},
		{metrics.OperationFindInvoice, metrics.OutcomeNotFound, 1},
		{metrics.OperationFindInvoice, metrics.OutcomeOK, 1},
		{metrics.OperationFindInvoice, "transient", 0}, // started at zero
	} {
		if v := value(t, mfs, "dealbridge_erp_requests_total", "operation="+c.op, "outcome="+c.outcome); v != c.want {
			t.Errorf("dealbridge_erp_requests_total{%s,%s} = %v, want %v", c.op, c.outcome, v, c.want)
		}
	}
	var observed uint64
	for _, mm := range mfs["dealbridge_erp_request_duration_seconds"].GetMetric() {
		observed += mm.GetHistogram().GetSampleCount()
	}
	if observed != 7 {
		t.Errorf("duration histogram observed %d calls, want 7", observed)
	}
}

func TestBreakerState(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	fake := &fakePort{errs: []error{errors.New("down"), errors.New("down")}}
	b := erp.NewBreaker(fake, erp.BreakerConfig{FailureThreshold: 2})
	if err := metrics.RegisterBreaker(reg, b); err != nil {
		t.Fatal(err)
	}
	if v := value(t, gathered(t, reg), "dealbridge_erp_breaker_state", "state=closed"); v != 1 {
		t.Errorf("closed = %v before any failure, want 1", v)
	}
	for range 2 {
		_, _ = b.CreateInvoice(context.Background(), erp.InvoiceRequest{Key: "d:2"})
	}
	mfs := gathered(t, reg)
	if v := value(t, mfs, "dealbridge_erp_breaker_state", "state=open"); v != 1 {
		t.Errorf("open = %v after two failures, want 1", v)
	}
	if v := value(t, mfs, "dealbridge_erp_breaker_state", "state=closed"); v != 0 {
		t.Errorf("closed = %v after two failures, want 0", v)
	}
}
