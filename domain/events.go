package domain

import (
	"encoding/json"
	"fmt"
	"time"
)

// Event is a domain event. Its type name and schema version are stored with
// it in the event log; DecodeEvent turns the stored form back into a value.
type Event interface {
	EventType() string
}

// Event type names as stored in the event log. Renaming one orphans every
// stored event of that type: add a new type and an upcaster instead.
const (
	TypeDealCreated        = "DealCreated"
	TypeDealWon            = "DealWon"
	TypeDealLost           = "DealLost"
	TypeInvoiceCreated     = "InvoiceCreated"
	TypeInventorySet       = "InventorySet"
	TypeInventoryAllocated = "InventoryAllocated"
	TypeInventoryReleased  = "InventoryReleased"
)

// SchemaVersion is the current schema version of every event type.
const SchemaVersion = 1

// DealCreated opens a deal stream.
type DealCreated struct {
	DealID   string   `json:"deal_id"`
	Customer Customer `json:"customer"`
	Currency string   `json:"currency"`
	Lines    []Line   `json:"lines"`
	Total    string   `json:"total"`
}

// DealWon records the close as won. CloseVersion is the stream version of
// this event and with the deal id forms the invoice idempotency key.
type DealWon struct {
	DealID         string `json:"deal_id"`
	CloseVersion   int    `json:"close_version"`
	IdempotencyKey string `json:"idempotency_key"`
	PreviousStatus Status `json:"previous_status"`
}

// DealLost records the close as lost. Nothing is invoiced or allocated.
type DealLost struct {
	DealID         string `json:"deal_id"`
	PreviousStatus Status `json:"previous_status"`
}

// InvoiceCreated records the ERP invoice for the deal's current close.
type InvoiceCreated struct {
	DealID         string `json:"deal_id"`
	IdempotencyKey string `json:"idempotency_key"`
	InvoiceNumber  string `json:"invoice_number"`
	Attempts       int    `json:"attempts,omitempty"` // ERP attempts it took, this one included
	Total          string `json:"total"`
	Currency       string `json:"currency"`
}

// InventorySet sets the available stock of a SKU to an absolute value.
type InventorySet struct {
	SKU       string `json:"sku"`
	Available int64  `json:"available"`
}

// InventoryAllocated takes Quantity of a SKU for a won deal.
type InventoryAllocated struct {
	SKU      string `json:"sku"`
	DealID   string `json:"deal_id"`
	Quantity int64  `json:"quantity"`
}

// InventoryReleased gives back what InventoryAllocated took (compensation).
type InventoryReleased struct {
	SKU      string `json:"sku"`
	DealID   string `json:"deal_id"`
	Quantity int64  `json:"quantity"`
}

func (DealCreated) EventType() string        { return TypeDealCreated }
func (DealWon) EventType() string            { return TypeDealWon }
func (DealLost) EventType() string           { return TypeDealLost }
func (InvoiceCreated) EventType() string     { return TypeInvoiceCreated }
func (InventorySet) EventType() string       { return TypeInventorySet }
func (InventoryAllocated) EventType() string { return TypeInventoryAllocated }
func (InventoryReleased) EventType() string  { return TypeInventoryReleased }

// decoders maps each event type to a decoder of its current schema.
var decoders = map[string]func([]byte) (Event, error){
	TypeDealCreated:          decodeAs[DealCreated],
	TypeDealWon:              decodeAs[DealWon],
	TypeDealLost:             decodeAs[DealLost],
	TypeInvoiceCreated:       decodeAs[InvoiceCreated],
	TypeInventorySet:         decodeAs[InventorySet],
	TypeInventoryAllocated:   decodeAs[InventoryAllocated],
	TypeInventoryReleased:    decodeAs[InventoryReleased],
	TypeInvoiceAttemptFailed: decodeAs[InvoiceAttemptFailed],
	TypeInvoiceFailed:        decodeAs[InvoiceFailed],
	TypeDealReverted:         decodeAs[DealReverted],
	TypeAlertRaised:          decodeAs[AlertRaised],
	TypeMessageDeadLettered:  decodeAs[MessageDeadLettered],
	TypeDeadLetterEdited:     decodeAs[DeadLetterEdited],
	TypeDeadLetterApproved:   decodeAs[DeadLetterApproved],
	TypeDeadLetterReinjected: decodeAs[DeadLetterReinjected],
	TypeDeadLetterDiscarded:  decodeAs[DeadLetterDiscarded],
	TypeDeadLetterResolved:   decodeAs[DeadLetterResolved],
	TypeDeadLetterReopened:   decodeAs[DeadLetterReopened],
	TypeAlertAcknowledged:    decodeAs[AlertAcknowledged],
	TypeAlertResolved:        decodeAs[AlertResolved],
	TypeDealReinstated:       decodeAs[DealReinstated],
	TypeInvoiceSagaResumed:   decodeAs[InvoiceSagaResumed],
}

func decodeAs[T Event](payload []byte) (Event, error) {
	var v T
	if err := json.Unmarshal(payload, &v); err != nil {
		return nil, err
	}
	return v, nil
}

// DecodeEvent turns a stored event back into its value. An unknown type or
// a schema version newer than this code knows is an error, never a guess.
func DecodeEvent(typ string, schemaVersion int, payload []byte) (Event, error) {
	// Old versions are upcast to the current shape first (upcast.go).
	typ, _, payload, err := Upcast(typ, schemaVersion, payload)
	if err != nil {
		return nil, err
	}
	dec, ok := decoders[typ]
	if !ok {
		return nil, fmt.Errorf("unknown event type %q", typ)
	}
	e, err := dec(payload)
	if err != nil {
		return nil, fmt.Errorf("cannot decode %s event: %w", typ, err)
	}
	return e, nil
}

// Metadata travels with every event: who caused it and why.
type Metadata struct {
	CorrelationID string `json:"correlation_id,omitempty"`
	CausationID   string `json:"causation_id,omitempty"`
	Actor         string `json:"actor,omitempty"`
}

// RecordedEvent is an event as it sits in the log.
type RecordedEvent struct {
	Position      int64
	StreamID      string
	StreamVersion int
	SchemaVersion int
	Event         Event
	Metadata      Metadata
	RecordedAt    time.Time
}

// Change is a batch of events for one stream, appended only if the stream is
// still at ExpectedVersion.
type Change struct {
	StreamID        string
	ExpectedVersion int
	Events          []Event
}

// DealStream and InventoryStream name the event streams.
func DealStream(dealID string) string { return "deal-" + dealID }

// InventoryStream names the stream of one SKU's stock.
func InventoryStream(sku string) string { return "inventory-" + sku }
