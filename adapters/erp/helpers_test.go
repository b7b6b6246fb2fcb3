package erp_test

import (
	"errors"
	"fmt"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/domain"
)

// startSim serves a simulator over real HTTP for the duration of the test.
func startSim(t *testing.T, cfg erpsim.Config) (*erpsim.Server, *httptest.Server) {
	t.Helper()
	sim, err := erpsim.New(cfg)
	if err != nil {
		t.Fatalf("erpsim.New: %v", err)
	}
	ts := httptest.NewServer(sim.Handler())
	t.Cleanup(func() {
		_ = sim.Close() // releases hung handlers first
		ts.Close()
	})
	return sim, ts
}

func newClient(baseURL string, timeout time.Duration) *erp.HTTPClient {
	return erp.NewHTTPClient(erp.HTTPConfig{BaseURL: baseURL, Timeout: timeout})
}

func request(key string) erp.InvoiceRequest {
	return erp.InvoiceRequest{
		Key: key, Reference: "DEAL-" + key, CustomerID: "C-1", CustomerName: "Acme GmbH", Currency: "EUR",
		Lines: []erp.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 3, UnitPrice: "12.50"}},
		Total: "37.50",
	}
}

// erpErr asserts that err is a *domain.ERPError of class want.
func erpErr(t *testing.T, err error, want domain.ErrorClass) *domain.ERPError {
	t.Helper()
	var e *domain.ERPError
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *domain.ERPError", err, err)
	}
	if e.Class != want {
		t.Fatalf("class = %s, want %s (err: %v)", e.Class, want, err)
	}
	return e
}

func keyN(prefix string, i int) string { return fmt.Sprintf("%s-%d", prefix, i) }
