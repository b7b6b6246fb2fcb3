package domain

import (
	"encoding/json"
	"time"
	"unicode/utf8"
)

// Saga states of an invoice saga (one per idempotency key K).
const (
	SagaPending     = "pending"     // the close committed; no ERP attempt has failed yet
	SagaRetrying    = "retrying"    // an attempt failed; the next one is scheduled
	SagaInvoiced    = "invoiced"    // the ERP invoice is recorded (terminal)
	SagaCompensated = "compensated" // failed, deal reverted, alerted, dead-lettered (terminal until re-injected)
)

// Event types of sagas, alerts and dead letters.
const (
	TypeInvoiceAttemptFailed = "InvoiceAttemptFailed"
	TypeInvoiceFailed        = "InvoiceFailed"
	TypeDealReverted         = "DealReverted"
	TypeAlertRaised          = "AlertRaised"
	TypeMessageDeadLettered  = "MessageDeadLettered"
)

// SagaStream names the stream of the invoice saga for key K.
func SagaStream(key string) string { return "invoice-" + key }

// AlertStream names an alert's stream.
func AlertStream(id string) string { return "alert-" + id }

// DeadLetterStream names a dead letter's stream.
func DeadLetterStream(id string) string { return "deadletter-" + id }

// InvoiceAttemptFailed records one failed ERP attempt and when the next one
// is due. The due time is decided once, here, so replay reproduces it. The
// attempt that ends the saga is recorded too, with Final set and no next
// time, in the transaction that records InvoiceFailed.
type InvoiceAttemptFailed struct {
	DealID         string     `json:"deal_id"`
	IdempotencyKey string     `json:"idempotency_key"`
	Attempt        int        `json:"attempt"`
	ErrorClass     ErrorClass `json:"error_class"`
	StatusCode     int        `json:"status_code,omitempty"`
	Message        string     `json:"message"`
	LatencyMS      int64      `json:"latency_ms"`
	AttemptedAt    time.Time  `json:"attempted_at"`
	NextAttemptAt  time.Time  `json:"next_attempt_at"`
	Final          bool       `json:"final,omitempty"`
}

// InvoiceFailed ends a saga without an invoice: retries ran out or the ERP
// rejected the payload.
type InvoiceFailed struct {
	DealID         string     `json:"deal_id"`
	IdempotencyKey string     `json:"idempotency_key"`
	ErrorClass     ErrorClass `json:"error_class"`
	Reason         string     `json:"reason"`
	Attempts       int        `json:"attempts"`
}

// DealReverted is the compensation of a won close: the deal leaves won for
// reverted and its allocation is released (InventoryReleased events on the
// inventory streams, in the same transaction).
type DealReverted struct {
	DealID         string `json:"deal_id"`
	IdempotencyKey string `json:"idempotency_key"`
	Reason         string `json:"reason"`
}

// AlertRaised opens an alert for the admin dashboard.
type AlertRaised struct {
	AlertID        string `json:"alert_id"`
	Kind           string `json:"kind"`
	Severity       string `json:"severity"`
	DealID         string `json:"deal_id,omitempty"`
	IdempotencyKey string `json:"idempotency_key,omitempty"`
	DeadLetterID   string `json:"dead_letter_id,omitempty"`
	Message        string `json:"message"`
}

// MessageDeadLettered parks a message that could not be processed, with
// everything an operator needs to fix and re-inject it.
type MessageDeadLettered struct {
	DeadLetterID   string            `json:"dead_letter_id"`
	DealID         string            `json:"deal_id,omitempty"`
	IdempotencyKey string            `json:"idempotency_key,omitempty"`
	MessageUUID    string            `json:"message_uuid"`
	Topic          string            `json:"topic"`
	Handler        string            `json:"handler"`
	Payload        json.RawMessage   `json:"payload,omitempty"`      // when the payload is JSON
	PayloadText    string            `json:"payload_text,omitempty"` // otherwise, when it is UTF-8
	PayloadBase64  []byte            `json:"payload_base64,omitempty"`
	Metadata       map[string]string `json:"metadata"`
	Reason         string            `json:"reason"`
	ErrorClass     string            `json:"error_class"`
	Attempts       int               `json:"attempts"`
	FirstFailureAt time.Time         `json:"first_failure_at"`
	LastFailureAt  time.Time         `json:"last_failure_at"`
}

// SetPayload stores raw in the most readable lossless form.
func (e *MessageDeadLettered) SetPayload(raw []byte) {
	switch {
	case json.Valid(raw):
		e.Payload = append(json.RawMessage(nil), raw...)
	case utf8.Valid(raw):
		e.PayloadText = string(raw)
	default:
		e.PayloadBase64 = append([]byte(nil), raw...)
	}
}

// RawPayload returns the payload bytes as they were.
func (e MessageDeadLettered) RawPayload() []byte {
	switch {
	case e.Payload != nil:
		return e.Payload
	case e.PayloadText != "":
		return []byte(e.PayloadText)
	}
	return e.PayloadBase64
}

// Error classes of dead letters beyond the ERP taxonomy.
const (
	ClassPoison                 = "poison"
	ClassExhausted              = "exhausted"
	AlertKindInvoiceFailed      = "invoice_failed"
	AlertKindPoison             = "poison_message"
	AlertKindCompensationFailed = "compensation_failed"
	AlertKindDuplicateInvoice   = "duplicate_invoice"
	SeverityCritical            = "critical"
	SeverityWarning             = "warning"
)

func (InvoiceAttemptFailed) EventType() string { return TypeInvoiceAttemptFailed }
func (InvoiceFailed) EventType() string        { return TypeInvoiceFailed }
func (DealReverted) EventType() string         { return TypeDealReverted }
func (AlertRaised) EventType() string          { return TypeAlertRaised }
func (MessageDeadLettered) EventType() string  { return TypeMessageDeadLettered }

// Revert compensates the close identified by key: the deal goes to
// reverted and every allocated SKU is released. stock must hold the current
// stock of every SKU on the deal (for the inventory streams' versions).
// Compensation is idempotent: a deal already reverted for this key yields
// no change and no error. A deal that is invoiced is never reverted.
func (d *Deal) Revert(key, reason string, stock map[string]Stock) ([]Change, error) {
	if d.status == StatusReverted && d.invoiceKey == key {
		return nil, nil
	}
	if d.status != StatusWon || d.invoiceKey != key {
		return nil, &TransitionError{From: d.status, Action: "revert"}
	}
	changes := []Change{{StreamID: DealStream(d.id), ExpectedVersion: d.version,
		Events: []Event{DealReverted{DealID: d.id, IdempotencyKey: key, Reason: reason}}}}
	for _, q := range d.Quantities() {
		changes = append(changes, Change{StreamID: InventoryStream(q.SKU), ExpectedVersion: stock[q.SKU].Version,
			Events: []Event{InventoryReleased{SKU: q.SKU, DealID: d.id, Quantity: q.Quantity}}})
	}
	return changes, nil
}
