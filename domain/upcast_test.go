package domain

import (
	"strings"
	"testing"
)

func TestDecodeUpcastsLegacyDealCreated(t *testing.T) {
	e, err := DecodeEvent(TypeDealCreated, 0, []byte(`{"id":"d-1","customer":"Initech","customer_id":"C-1","currency":"JPY",
		"amount":1000.4,"items":[{"sku":"S-1","name":"Stapler","qty":2,"price":500.2}]}`))
	if err != nil {
		t.Fatal(err)
	}
	got, ok := e.(DealCreated)
	if !ok {
		t.Fatalf("decoded %T", e)
	}
	want := DealCreated{DealID: "d-1", Customer: Customer{ID: "C-1", Name: "Initech"}, Currency: "JPY", Total: "1000",
		Lines: []Line{{SKU: "S-1", Description: "Stapler", Quantity: 2, UnitPrice: "500"}}}
	if got.DealID != want.DealID || got.Customer != want.Customer || got.Total != want.Total || got.Lines[0] != want.Lines[0] {
		t.Fatalf("got %+v, want %+v (JPY has no minor unit)", got, want)
	}
}

func TestDecodeUpcastsLegacyDealWonAndQuantities(t *testing.T) {
	e, err := DecodeEvent(TypeDealWon, 0, []byte(`{"deal_id":"d-1","close_version":2}`))
	if err != nil {
		t.Fatal(err)
	}
	if w := e.(DealWon); w.IdempotencyKey != "d-1:2" || w.PreviousStatus != StatusOpen || w.CloseVersion != 2 {
		t.Fatalf("got %+v", w)
	}
	e, err = DecodeEvent(TypeInventoryReleased, 0, []byte(`{"sku":"S","deal_id":"d-1","qty":3}`))
	if err != nil {
		t.Fatal(err)
	}
	if r := e.(InventoryReleased); r.Quantity != 3 || r.SKU != "S" {
		t.Fatalf("got %+v", r)
	}
}

func TestDecodeRefusesWhatItCannotUpcast(t *testing.T) {
	for _, c := range []struct {
		typ     string
		version int
		payload string
		want    string
	}{
		{TypeDealCreated, 2, `{}`, "unsupported schema version 2"},
		{TypeDealLost, 0, `{}`, "no upcaster"},
		{TypeDealCreated, -1, `{}`, "no upcaster"},
		// An old field the upcaster does not know would be lost: refused.
		{TypeDealWon, 0, `{"deal_id":"d","close_version":2,"reason":"x"}`, "unknown field"},
		{TypeDealCreated, 0, `{"id":"d","customer":"X","customer_id":"C","currency":"USD","amount":-1,"items":[]}`, "negative"},
		{TypeDealCreated, 0, `{"id":"d","customer":"X","customer_id":"C","currency":"XXX","amount":1,"items":[]}`, "incomplete"},
		{"NoSuchEvent", 1, `{}`, "unknown event type"},
	} {
		_, err := DecodeEvent(c.typ, c.version, []byte(c.payload))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s v%d %s: error %v, want %q", c.typ, c.version, c.payload, err, c.want)
		}
	}
}

func TestCurrentVersionsDecodeUnchanged(t *testing.T) {
	for typ := range decoders {
		if v := CurrentSchemaVersion(typ); v != SchemaVersion {
			t.Errorf("%s is at version %d; its upcaster from %d needs a fixture event (projections/testdata)", typ, v, v-1)
		}
	}
	e, err := DecodeEvent(TypeDealWon, SchemaVersion, []byte(`{"deal_id":"d","close_version":3,"idempotency_key":"d:3","previous_status":"reverted"}`))
	if err != nil || e.(DealWon).PreviousStatus != StatusReverted {
		t.Fatalf("%+v %v", e, err)
	}
}
