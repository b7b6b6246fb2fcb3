package metrics

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/domain"
)

// ERP call operations and outcomes, the label values of the ERP metrics.
const (
	OperationCreateInvoice = "create_invoice"
	OperationFindInvoice   = "find_invoice"

	OutcomeOK       = "ok"
	OutcomeNotFound = "not_found" // a lookup that found no invoice for the key
	OutcomeCanceled = "canceled"  // the caller gave up (shutdown, its deadline)
	// Failures are labelled with their domain.ErrorClass: transient,
	// rate_limited, permanent, ambiguous.
)

// ERPMetrics counts and times calls to an ERP port.
type ERPMetrics struct {
	calls    *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewERPMetrics registers the ERP call metrics with reg:
// dealbridge_erp_requests_total and dealbridge_erp_request_duration_seconds,
// by operation and outcome.
func NewERPMetrics(reg prometheus.Registerer) (*ERPMetrics, error) {
	m := &ERPMetrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "erp", Name: "requests_total",
			Help: "ERP calls by operation (create_invoice, find_invoice) and outcome (ok, not_found, canceled, or the error class: transient, rate_limited, permanent, ambiguous).",
		}, []string{"operation", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: "erp", Name: "request_duration_seconds",
			Help:    "Duration of ERP calls by operation and outcome.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"operation", "outcome"}),
	}
	for _, c := range []prometheus.Collector{m.calls, m.duration} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("cannot register ERP metrics: %w", err)
		}
	}
	// Start the common series at zero, so that rate() sees their first
	// increment.
	for _, op := range []string{OperationCreateInvoice, OperationFindInvoice} {
		for _, o := range []string{OutcomeOK, string(domain.ErrorTransient)} {
			m.calls.WithLabelValues(op, o)
		}
	}
	return m, nil
}

// Instrument returns port with every call counted and timed. Wrap the ERP
// client inside the circuit breaker, so that calls the breaker refuses
// (which never reach the ERP) are not counted as ERP calls.
func (m *ERPMetrics) Instrument(port erp.Port) erp.Port {
	return &instrumentedPort{port: port, m: m}
}

func (m *ERPMetrics) observe(op string, start time.Time, err error, found bool) {
	outcome := OutcomeOK
	switch {
	case err != nil && (errors.Is(err, context.Canceled)):
		outcome = OutcomeCanceled
	case err != nil:
		outcome = string(domain.ClassOf(err))
	case !found:
		outcome = OutcomeNotFound
	}
	m.calls.WithLabelValues(op, outcome).Inc()
	m.duration.WithLabelValues(op, outcome).Observe(time.Since(start).Seconds())
}

type instrumentedPort struct {
	port erp.Port
	m    *ERPMetrics
}

func (p *instrumentedPort) CreateInvoice(ctx context.Context, req erp.InvoiceRequest) (erp.Invoice, error) {
	start := time.Now()
	inv, err := p.port.CreateInvoice(ctx, req)
	p.m.observe(OperationCreateInvoice, start, err, true)
	return inv, err
}

func (p *instrumentedPort) FindInvoiceByKey(ctx context.Context, key string) (erp.Invoice, bool, error) {
	start := time.Now()
	inv, ok, err := p.port.FindInvoiceByKey(ctx, key)
	p.m.observe(OperationFindInvoice, start, err, ok)
	return inv, ok, err
}

// RegisterBreaker registers dealbridge_erp_breaker_state{state}: 1 for the
// state b is in (closed, open, half-open), 0 for the others.
func RegisterBreaker(reg prometheus.Registerer, b *erp.Breaker) error {
	for _, s := range []string{erp.StateClosed, erp.StateOpen, erp.StateHalfOpen} {
		g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: Namespace, Subsystem: "erp", Name: "breaker_state",
			Help:        "1 for the state the ERP circuit breaker of this process is in (closed, open, half-open), 0 for the others.",
			ConstLabels: prometheus.Labels{"state": s},
		}, func() float64 {
			if b.State() == s {
				return 1
			}
			return 0
		})
		if err := reg.Register(g); err != nil {
			return fmt.Errorf("cannot register the breaker state: %w", err)
		}
	}
	return nil
}
