// Package erp is the ERP side of dealbridge: the Port the invoice saga
// depends on, a generic HTTP/JSON client for it, and a circuit breaker that
// wraps any Port.
//
// Every error returned by a Port implementation in this package is a
// *domain.ERPError whose Class tells the saga what to do next:
//
//   - domain.ErrorTransient: the create certainly did not take effect; retry
//     with the same key after a backoff (honouring RetryAfter when set).
//   - domain.ErrorRateLimited: the ERP asked us to slow down; retry no
//     earlier than RetryAfter.
//   - domain.ErrorPermanent: the ERP rejected the payload; Message holds what
//     it said. Retrying the same payload cannot succeed.
//   - domain.ErrorAmbiguous: the create may have taken effect. Call
//     FindInvoiceByKey before deciding anything (invariant I3).
package erp

import (
	"context"
	"time"
)

// Line is one invoice line. Money is a decimal string ("12.50"), never a
// float.
type Line struct {
	SKU         string `json:"sku"`
	Description string `json:"description"`
	Quantity    int64  `json:"quantity"`
	UnitPrice   string `json:"unit_price"`
}

// InvoiceRequest asks the ERP for one invoice. Key is the idempotency key K
// (deal id + close version): the ERP creates at most one invoice per Key.
// Amounts are decimal strings.
type InvoiceRequest struct {
	Key          string `json:"key"`       // idempotency key K; sent as a header, not in the body
	Reference    string `json:"reference"` // the deal id
	CustomerID   string `json:"customer_id"`
	CustomerName string `json:"customer_name"`
	Currency     string `json:"currency"` // ISO 4217, e.g. "EUR"
	Lines        []Line `json:"lines"`
	Total        string `json:"total"`
}

// Invoice is an invoice as the ERP reports it.
type Invoice struct {
	Number     string    `json:"number"`
	Key        string    `json:"key"`
	Reference  string    `json:"reference"`
	CustomerID string    `json:"customer_id"`
	Currency   string    `json:"currency"`
	Total      string    `json:"total"`
	Status     string    `json:"status"`
	Lines      []Line    `json:"lines"`
	CreatedAt  time.Time `json:"created_at"`
	// Duplicates, set by FindInvoiceByKey, names the other invoices the ERP
	// holds for the same key (an ERP without idempotency after a race):
	// the caller records this one and raises a duplicate_invoice alert.
	Duplicates []string `json:"duplicates,omitempty"`
}

// Port is what the invoice saga needs from any ERP.
//
// Implementations must be safe for concurrent use and must return errors as
// *domain.ERPError (see the package documentation for what each class
// promises).
type Port interface {
	// CreateInvoice creates the invoice for req.Key, or returns the invoice
	// already created for that key (the ERP deduplicates on the key).
	CreateInvoice(ctx context.Context, req InvoiceRequest) (Invoice, error)
	// FindInvoiceByKey returns the invoice created for key, or
	// (Invoice{}, false, nil) when the ERP has none. It never returns
	// domain.ErrorAmbiguous: a lookup changes nothing, so any failure is
	// safe to retry.
	FindInvoiceByKey(ctx context.Context, key string) (Invoice, bool, error)
}
