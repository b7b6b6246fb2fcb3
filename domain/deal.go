package domain

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/shopspring/decimal"
)

// Status is a deal's CRM status.
//
//	open → won → invoiced
//	        won → reverted   (compensation, next issue)
//	open → lost
type Status string

const (
	StatusOpen     Status = "open"
	StatusWon      Status = "won"
	StatusInvoiced Status = "invoiced"
	StatusReverted Status = "reverted"
	StatusLost     Status = "lost"
)

// Outcome is how a deal is closed.
type Outcome string

const (
	OutcomeWon  Outcome = "won"
	OutcomeLost Outcome = "lost"
)

// Customer is who the deal is with.
type Customer struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

// Line is one deal line. UnitPrice is a decimal string.
type Line struct {
	SKU         string `json:"sku"`
	Description string `json:"description"`
	Quantity    int64  `json:"quantity"`
	UnitPrice   string `json:"unit_price"`
}

const maxQuantity = 1_000_000

var (
	skuRE        = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	customerIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$`)
)

// ValidSKU reports whether s is an acceptable SKU.
func ValidSKU(s string) bool { return skuRE.MatchString(s) }

// Deal is the deal aggregate. Its fields are unexported so that every change
// goes through a method that checks the status machine and emits events.
type Deal struct {
	id           string
	customer     Customer
	currency     string
	lines        []Line
	total        decimal.Decimal
	status       Status
	version      int
	closeVersion int
	prevStatus   Status
	invoiceKey   string
	invoiceNo    string
}

// NewDeal validates a new deal and returns it with its DealCreated event.
func NewDeal(id string, customer Customer, currency string, lines []Line) (*Deal, Change, error) {
	if !customerIDRE.MatchString(customer.ID) {
		return nil, Change{}, invalid("customer.id", "must be 1-64 letters, digits or ._:-")
	}
	customer.Name = strings.TrimSpace(customer.Name)
	if customer.Name == "" || len(customer.Name) > 200 {
		return nil, Change{}, invalid("customer.name", "must be 1-200 characters")
	}
	if !ValidCurrency(currency) {
		return nil, Change{}, invalid("currency", "%q is not a supported ISO 4217 code", currency)
	}
	if len(lines) == 0 || len(lines) > 100 {
		return nil, Change{}, invalid("lines", "must have 1-100 lines")
	}
	total := decimal.Zero
	for i, l := range lines {
		f := func(name string) string { return fmt.Sprintf("lines[%d].%s", i, name) }
		if !ValidSKU(l.SKU) {
			return nil, Change{}, invalid(f("sku"), "must be 1-64 letters, digits or ._-")
		}
		if len(l.Description) > 500 {
			return nil, Change{}, invalid(f("description"), "must be at most 500 characters")
		}
		if l.Quantity < 1 || l.Quantity > maxQuantity {
			return nil, Change{}, invalid(f("quantity"), "must be between 1 and %d", maxQuantity)
		}
		p, err := ParseAmount(l.UnitPrice, currency)
		if err != nil {
			return nil, Change{}, invalid(f("unit_price"), "%v", err)
		}
		total = total.Add(p.Mul(decimal.NewFromInt(l.Quantity)))
	}
	ev := DealCreated{DealID: id, Customer: customer, Currency: currency, Lines: lines, Total: FormatAmount(total, currency)}
	d := &Deal{}
	d.apply(ev)
	return d, Change{StreamID: DealStream(id), ExpectedVersion: 0, Events: []Event{ev}}, nil
}

// apply folds one event into the aggregate. It never fails: events are facts.
func (d *Deal) apply(e Event) {
	d.version++
	switch e := e.(type) {
	case DealCreated:
		d.id, d.customer, d.currency, d.lines = e.DealID, e.Customer, e.Currency, e.Lines
		d.total, _ = decimal.NewFromString(e.Total)
		d.status = StatusOpen
	case DealWon:
		d.prevStatus = e.PreviousStatus
		d.closeVersion = e.CloseVersion
		d.invoiceKey = e.IdempotencyKey
		d.invoiceNo = ""
		d.status = StatusWon
	case DealLost:
		d.prevStatus = e.PreviousStatus
		d.status = StatusLost
	case InvoiceCreated:
		d.invoiceNo = e.InvoiceNumber
		d.status = StatusInvoiced
	case DealReverted:
		d.status = StatusReverted
	case DealReinstated:
		d.status = StatusWon
		d.invoiceKey = e.IdempotencyKey
		d.invoiceNo = ""
	}
}

// RehydrateDeal rebuilds a deal from its stream. Use it to load; it is not a
// constructor and does not validate.
func RehydrateDeal(events []Event) (*Deal, error) {
	if len(events) == 0 {
		return nil, ErrNotFound
	}
	if _, ok := events[0].(DealCreated); !ok {
		return nil, fmt.Errorf("deal stream starts with %s, not DealCreated", events[0].EventType())
	}
	d := &Deal{}
	for _, e := range events {
		d.apply(e)
	}
	return d, nil
}

// DealSnapshot is the deal's state as the read model stores it.
type DealSnapshot struct {
	ID             string
	Customer       Customer
	Currency       string
	Lines          []Line
	Total          string
	Status         Status
	Version        int
	CloseVersion   int
	PreviousStatus Status
	IdempotencyKey string
	InvoiceNumber  string
}

// UnmarshalDealFromDatabase rebuilds a deal from its read-model row, which
// the projection keeps equal to the fold of the stream in the same
// transaction. It should be used only for loading from the database.
func UnmarshalDealFromDatabase(s DealSnapshot) (*Deal, error) {
	t, err := decimal.NewFromString(s.Total)
	if err != nil {
		return nil, fmt.Errorf("deal %s: stored total %q: %w", s.ID, s.Total, err)
	}
	return &Deal{
		id: s.ID, customer: s.Customer, currency: s.Currency, lines: s.Lines, total: t,
		status: s.Status, version: s.Version, closeVersion: s.CloseVersion, prevStatus: s.PreviousStatus,
		invoiceKey: s.IdempotencyKey, invoiceNo: s.InvoiceNumber,
	}, nil
}

func (d *Deal) ID() string            { return d.id }
func (d *Deal) Status() Status        { return d.status }
func (d *Deal) Version() int          { return d.version }
func (d *Deal) Currency() string      { return d.currency }
func (d *Deal) Customer() Customer    { return d.customer }
func (d *Deal) Lines() []Line         { return d.lines }
func (d *Deal) Total() string         { return FormatAmount(d.total, d.currency) }
func (d *Deal) CloseVersion() int     { return d.closeVersion }
func (d *Deal) InvoiceKey() string    { return d.invoiceKey }
func (d *Deal) InvoiceNumber() string { return d.invoiceNo }

// Quantities returns the total quantity per SKU, sorted by SKU so that
// inventory rows are always locked in the same order (no deadlocks).
func (d *Deal) Quantities() []SKUQuantity {
	m := map[string]int64{}
	for _, l := range d.lines {
		m[l.SKU] += l.Quantity
	}
	out := make([]SKUQuantity, 0, len(m))
	for sku, q := range m {
		out = append(out, SKUQuantity{SKU: sku, Quantity: q})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].SKU < out[j].SKU })
	return out
}

// SKUQuantity is a quantity of one SKU.
type SKUQuantity struct {
	SKU      string
	Quantity int64
}

// Stock is the current state of one inventory item, as the close needs it.
type Stock struct {
	SKU       string
	Available int64
	Version   int // stream version of inventory-SKU, 0 when it has none
}

// IdempotencyKey is K: the deal id plus its close version. A later close of
// the same deal gets a new K; a redelivery of the same close gets the same K.
func IdempotencyKey(dealID string, closeVersion int) string {
	return dealID + ":" + strconv.Itoa(closeVersion)
}

// Close closes the deal. For a win, stock must hold the current stock of
// every SKU on the deal (see Quantities); the allocation is all or nothing.
// expectedVersion, when not nil, must equal the deal's version.
func (d *Deal) Close(outcome Outcome, expectedVersion *int, stock map[string]Stock) ([]Change, error) {
	if expectedVersion != nil && *expectedVersion != d.version {
		return nil, &ConflictError{Stream: DealStream(d.id), Expected: *expectedVersion, Actual: d.version}
	}
	if d.status != StatusOpen && d.status != StatusReverted {
		return nil, &TransitionError{From: d.status, Action: "close"}
	}
	switch outcome {
	case OutcomeLost:
		ev := DealLost{DealID: d.id, PreviousStatus: d.status}
		return []Change{{StreamID: DealStream(d.id), ExpectedVersion: d.version, Events: []Event{ev}}}, nil
	case OutcomeWon:
	default:
		return nil, invalid("outcome", "must be \"won\" or \"lost\"")
	}
	changes := []Change{}
	var alloc []Change
	for _, q := range d.Quantities() {
		s := stock[q.SKU]
		if s.Available < q.Quantity {
			return nil, &InsufficientStockError{SKU: q.SKU, Requested: q.Quantity, Available: s.Available}
		}
		alloc = append(alloc, Change{
			StreamID: InventoryStream(q.SKU), ExpectedVersion: s.Version,
			Events: []Event{InventoryAllocated{SKU: q.SKU, DealID: d.id, Quantity: q.Quantity}},
		})
	}
	cv := d.version + 1
	won := DealWon{DealID: d.id, CloseVersion: cv, IdempotencyKey: IdempotencyKey(d.id, cv), PreviousStatus: d.status}
	changes = append(changes, Change{StreamID: DealStream(d.id), ExpectedVersion: d.version, Events: []Event{won}})
	return append(changes, alloc...), nil
}

// RecordInvoice records the ERP invoice for the close identified by key.
// A second call for the same key is a no-op (nil change, nil error): the
// handler may be redelivered. An invoice for a key that is not the deal's
// current close is refused.
func (d *Deal) RecordInvoice(key, number string, attempts int) (*Change, error) {
	if d.status == StatusInvoiced && d.invoiceKey == key {
		return nil, nil
	}
	if d.status != StatusWon {
		return nil, &TransitionError{From: d.status, Action: "invoice"}
	}
	if key != d.invoiceKey {
		return nil, fmt.Errorf("invoice key %s is not the deal's current close %s", key, d.invoiceKey)
	}
	if number == "" {
		return nil, invalid("invoice_number", "must not be empty")
	}
	ev := InvoiceCreated{DealID: d.id, IdempotencyKey: key, InvoiceNumber: number, Attempts: attempts, Total: d.Total(), Currency: d.currency}
	return &Change{StreamID: DealStream(d.id), ExpectedVersion: d.version, Events: []Event{ev}}, nil
}

// InvoiceRequest is the message the outbox carries to the invoice saga for a
// won deal: everything the ERP needs, so the handler reads nothing else.
type InvoiceRequest struct {
	DealID         string   `json:"deal_id"`
	IdempotencyKey string   `json:"idempotency_key"`
	CloseVersion   int      `json:"close_version"`
	Customer       Customer `json:"customer"`
	Currency       string   `json:"currency"`
	Lines          []Line   `json:"lines"`
	Total          string   `json:"total"`
}

// InvoiceRequestFor builds the saga message for the deal's current close.
func (d *Deal) InvoiceRequestFor() InvoiceRequest {
	return InvoiceRequest{
		DealID: d.id, IdempotencyKey: d.invoiceKey, CloseVersion: d.closeVersion,
		Customer: d.customer, Currency: d.currency, Lines: d.lines, Total: d.Total(),
	}
}

// Apply folds events into the deal (after a successful append).
func (d *Deal) Apply(events ...Event) {
	for _, e := range events {
		d.apply(e)
	}
}

// InventoryChange sets the stock of sku to available.
func InventoryChange(sku string, available int64, current Stock) (Change, error) {
	if !ValidSKU(sku) {
		return Change{}, invalid("sku", "must be 1-64 letters, digits or ._-")
	}
	if available < 0 || available > 1_000_000_000 {
		return Change{}, invalid("available", "must be between 0 and 1000000000")
	}
	return Change{StreamID: InventoryStream(sku), ExpectedVersion: current.Version,
		Events: []Event{InventorySet{SKU: sku, Available: available}}}, nil
}
