// Package saga runs the invoice saga: it consumes invoice requests from the
// handler transport, calls the ERP with the request's idempotency key, and
// records the outcome in one local transaction.
//
// Delivery is at-least-once, so every step is idempotent: the ERP
// deduplicates creates by key K, and recording an invoice that is already
// recorded is a no-op. No database transaction is open while the ERP is
// called (invariant I5).
package saga

import (
	"encoding/json"
	"fmt"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// HandlerName is the watermill handler name of the invoice saga.
const HandlerName = "invoice-saga"

// InvoiceHandler handles invoice requests.
type InvoiceHandler struct {
	store  *postgres.Store
	erp    erp.Port
	logger *slog.Logger
}

// NewInvoiceHandler returns the invoice saga handler.
func NewInvoiceHandler(store *postgres.Store, port erp.Port, logger *slog.Logger) *InvoiceHandler {
	if store == nil || port == nil {
		panic("saga.NewInvoiceHandler: nil dependency")
	}
	return &InvoiceHandler{store: store, erp: port, logger: logger}
}

// Handle processes one invoice request. A nil return acks the message; an
// error nacks it and the transport redelivers it later.
func (h *InvoiceHandler) Handle(msg *message.Message) error {
	ctx := msg.Context()
	if t := msg.Metadata.Get(outbox.MetadataType); t != outbox.TypeInvoiceRequest {
		return fmt.Errorf("message %s: unexpected type %q", msg.UUID, t)
	}
	var req domain.InvoiceRequest
	if err := json.Unmarshal(msg.Payload, &req); err != nil {
		return fmt.Errorf("message %s: cannot decode invoice request: %w", msg.UUID, err)
	}
	state, ok, err := h.store.InvoiceState(ctx, req.IdempotencyKey)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("message %s: no saga for key %s", msg.UUID, req.IdempotencyKey)
	}
	if state == "invoiced" {
		h.logger.DebugContext(ctx, "invoice already recorded", "key", req.IdempotencyKey)
		return nil
	}
	inv, err := h.erp.CreateInvoice(ctx, toERP(req))
	if err != nil {
		return fmt.Errorf("deal %s: create invoice %s: %w", req.DealID, req.IdempotencyKey, err)
	}
	meta := domain.Metadata{
		CorrelationID: msg.Metadata.Get(outbox.MetadataCorrelationID),
		CausationID:   msg.UUID,
		Actor:         HandlerName,
	}
	recorded, err := h.store.RecordInvoice(ctx, req.DealID, req.IdempotencyKey, inv.Number, meta)
	if err != nil {
		return err
	}
	h.logger.InfoContext(ctx, "deal invoiced", "deal", req.DealID, "key", req.IdempotencyKey,
		"invoice", inv.Number, "recorded", recorded)
	return nil
}

func toERP(r domain.InvoiceRequest) erp.InvoiceRequest {
	lines := make([]erp.Line, len(r.Lines))
	for i, l := range r.Lines {
		lines[i] = erp.Line{SKU: l.SKU, Description: l.Description, Quantity: l.Quantity, UnitPrice: l.UnitPrice}
	}
	return erp.InvoiceRequest{
		Key: r.IdempotencyKey, Reference: r.DealID, CustomerID: r.Customer.ID, CustomerName: r.Customer.Name,
		Currency: r.Currency, Lines: lines, Total: r.Total,
	}
}
