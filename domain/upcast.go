package domain

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/shopspring/decimal"
)

// Event versioning.
//
// Every stored event carries the schema version of its payload. Code only
// ever decodes the current shape of a type; an upcaster turns a payload of
// version n into version n+1 (optionally under a new type name, for a
// renamed event), and DecodeEvent runs the chain of upcasters up to the
// current version before decoding. Stored events are never rewritten: the
// log is append-only and hash-chained, so old shapes stay in it for ever and
// are upcast on every read (live loads and replays alike).
//
// To change an event's shape: add its new current version to
// currentVersions, keep the old struct's JSON shape in an upcaster from the
// old version, and add old-version events to the fixture in
// projections/testdata so that the replay test keeps proving the chain.

// currentVersions holds the types whose current schema version is not
// SchemaVersion. Every type not listed is at SchemaVersion.
var currentVersions = map[string]int{}

// CurrentSchemaVersion is the schema version written for events of typ.
func CurrentSchemaVersion(typ string) int {
	if v, ok := currentVersions[typ]; ok {
		return v
	}
	return SchemaVersion
}

// LegacySchemaVersion is the version of events written by the prototype,
// before payloads were versioned (see the v0 upcasters below).
const LegacySchemaVersion = 0

// Upcaster turns a payload of one schema version into the next version. It
// may rename the type (return a different typ).
type Upcaster func(payload []byte) (typ string, out []byte, err error)

type upcastKey struct {
	typ     string
	version int
}

// upcasters maps (type, version) to the upcaster from that version to the
// next.
var upcasters = map[upcastKey]Upcaster{
	{TypeDealCreated, 0}:        upcastDealCreatedV0,
	{TypeDealWon, 0}:            upcastDealWonV0,
	{TypeInventoryAllocated, 0}: upcastInventoryQtyV0(TypeInventoryAllocated),
	{TypeInventoryReleased, 0}:  upcastInventoryQtyV0(TypeInventoryReleased),
}

// Upcast brings a stored payload to the current schema version of its type
// and returns the (possibly renamed) type, that version and the payload. A
// version newer than the code knows, or an old version without an upcaster,
// is an error, never a guess.
func Upcast(typ string, version int, payload []byte) (string, int, []byte, error) {
	for i := 0; ; i++ {
		cur := CurrentSchemaVersion(typ)
		switch {
		case version == cur:
			return typ, version, payload, nil
		case version > cur:
			return "", 0, nil, fmt.Errorf("event %s: unsupported schema version %d (this code knows up to %d)", typ, version, cur)
		case i > 100:
			return "", 0, nil, fmt.Errorf("event %s: upcaster loop", typ)
		}
		up, ok := upcasters[upcastKey{typ, version}]
		if !ok {
			return "", 0, nil, fmt.Errorf("event %s: unsupported schema version %d (no upcaster)", typ, version)
		}
		next, out, err := up(payload)
		if err != nil {
			return "", 0, nil, fmt.Errorf("cannot upcast %s from schema version %d: %w", typ, version, err)
		}
		typ, payload = next, out
		version++
	}
}

// The prototype's (version 0) shapes. Amounts were JSON numbers (floats)
// and the customer a flat name with a separate id; quantities were "qty".

type dealCreatedV0 struct {
	ID         string      `json:"id"`
	Customer   string      `json:"customer"`
	CustomerID string      `json:"customer_id"`
	Currency   string      `json:"currency"`
	Amount     json.Number `json:"amount"`
	Items      []struct {
		SKU   string      `json:"sku"`
		Name  string      `json:"name"`
		Qty   int64       `json:"qty"`
		Price json.Number `json:"price"`
	} `json:"items"`
}

func upcastDealCreatedV0(payload []byte) (string, []byte, error) {
	var v dealCreatedV0
	if err := strictUnmarshal(payload, &v); err != nil {
		return "", nil, err
	}
	if v.ID == "" || v.CustomerID == "" || !ValidCurrency(v.Currency) {
		return "", nil, fmt.Errorf("incomplete v0 DealCreated (id, customer_id and a known currency are required)")
	}
	total, err := legacyAmount(v.Amount, v.Currency)
	if err != nil {
		return "", nil, fmt.Errorf("amount: %w", err)
	}
	out := DealCreated{DealID: v.ID, Customer: Customer{ID: v.CustomerID, Name: v.Customer}, Currency: v.Currency, Total: total,
		Lines: make([]Line, 0, len(v.Items))}
	for i, it := range v.Items {
		p, err := legacyAmount(it.Price, v.Currency)
		if err != nil {
			return "", nil, fmt.Errorf("items[%d].price: %w", i, err)
		}
		out.Lines = append(out.Lines, Line{SKU: it.SKU, Description: it.Name, Quantity: it.Qty, UnitPrice: p})
	}
	b, err := json.Marshal(out)
	return TypeDealCreated, b, err
}

// legacyAmount turns a float amount of the prototype into today's decimal
// string with the currency's minor units. The prototype computed amounts in
// binary floating point, so a stored 0.30000000000000004 meant 0.30: the
// value is rounded (half away from zero) to the minor unit.
func legacyAmount(n json.Number, currency string) (string, error) {
	if n == "" {
		return "", fmt.Errorf("missing")
	}
	d, err := decimal.NewFromString(string(n))
	if err != nil {
		return "", err
	}
	if d.IsNegative() {
		return "", fmt.Errorf("negative amount %s", n)
	}
	return FormatAmount(d, currency), nil
}

type dealWonV0 struct {
	DealID       string `json:"deal_id"`
	CloseVersion int    `json:"close_version"`
}

// upcastDealWonV0: the prototype closed only open deals and did not store
// the idempotency key, which is derived from the close version.
func upcastDealWonV0(payload []byte) (string, []byte, error) {
	var v dealWonV0
	if err := strictUnmarshal(payload, &v); err != nil {
		return "", nil, err
	}
	if v.DealID == "" || v.CloseVersion < 1 {
		return "", nil, fmt.Errorf("incomplete v0 DealWon (deal_id and close_version are required)")
	}
	b, err := json.Marshal(DealWon{DealID: v.DealID, CloseVersion: v.CloseVersion,
		IdempotencyKey: IdempotencyKey(v.DealID, v.CloseVersion), PreviousStatus: StatusOpen})
	return TypeDealWon, b, err
}

func upcastInventoryQtyV0(typ string) Upcaster {
	return func(payload []byte) (string, []byte, error) {
		var v struct {
			SKU    string `json:"sku"`
			DealID string `json:"deal_id"`
			Qty    int64  `json:"qty"`
		}
		if err := strictUnmarshal(payload, &v); err != nil {
			return "", nil, err
		}
		b, err := json.Marshal(map[string]any{"sku": v.SKU, "deal_id": v.DealID, "quantity": v.Qty})
		return typ, b, err
	}
}

// strictUnmarshal refuses unknown fields: an upcaster that silently drops
// data it does not understand would make the replay lossy.
func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	return dec.Decode(v)
}
