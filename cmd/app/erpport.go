package app

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/tryton"
	"github.com/dealbridge/dealbridge/adapters/metrics"
)

// ERP adapters selectable with HandlerConfig.ERP (--erp).
const (
	ERPHTTP   = "http"
	ERPTryton = "tryton"
)

// ERPPort builds the ERP port cfg.ERP selects, behind the circuit breaker;
// closePort releases it (a Tryton session is logged out).
//
// With "tryton", invoices are created and posted in Tryton 6.0 over
// JSON-RPC (adapters/erp/tryton). Tryton cannot deduplicate concurrent
// creates for one deal; the work queue's ordering key (the deal id) gives
// at most one in-flight message per deal, which is what makes it safe.
func ERPPort(cfg HandlerConfig, logger *slog.Logger) (port erp.Port, closePort func(), err error) {
	bc := cfg.Breaker
	bc.Logger = logger
	// With metrics, the client is instrumented inside the breaker: calls
	// the breaker refuses never reach the ERP and are not ERP calls.
	instrument := func(p erp.Port) erp.Port { return p }
	if cfg.Metrics != nil {
		m, err := metrics.NewERPMetrics(cfg.Metrics)
		if err != nil {
			return nil, nil, err
		}
		instrument = m.Instrument
	}
	breaker := func(p erp.Port) (*erp.Breaker, error) {
		b := erp.NewBreaker(instrument(p), bc)
		if cfg.Metrics != nil {
			if err := metrics.RegisterBreaker(cfg.Metrics, b); err != nil {
				return nil, err
			}
		}
		return b, nil
	}
	switch cfg.ERP {
	case "", ERPHTTP:
		if cfg.ERPURL == "" {
			return nil, nil, errors.New("no ERP URL: set --erp-url or DEALBRIDGE_ERP_URL")
		}
		idle := 0 // the client's default
		if cfg.Consumers > 0 {
			idle = cfg.Consumers + 1 // +1: the reconciler's lookups
		}
		c := erp.NewHTTPClient(erp.HTTPConfig{BaseURL: cfg.ERPURL, Timeout: cfg.ERPTimeout, IdleConns: idle, Logger: logger})
		b, err := breaker(c)
		if err != nil {
			return nil, nil, err
		}
		return b, func() {}, nil
	case ERPTryton:
		tc := cfg.Tryton
		if tc.Timeout == 0 {
			tc.Timeout = cfg.ERPTimeout
		}
		if tc.Logger == nil {
			tc.Logger = logger
		}
		if err := tc.Validate(); err != nil {
			return nil, nil, fmt.Errorf("tryton: %w", err)
		}
		c := tryton.New(tc)
		b, err := breaker(c)
		if err != nil {
			return nil, nil, err
		}
		return b, func() {
			if err := c.Close(); err != nil {
				logger.Debug("tryton logout failed", "err", err)
			}
		}, nil
	}
	return nil, nil, fmt.Errorf("unknown ERP %q: want %s or %s", cfg.ERP, ERPHTTP, ERPTryton)
}
