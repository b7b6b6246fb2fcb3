package domain_test

import (
	"errors"
	"testing"

	"github.com/shopspring/decimal"
	"pgregory.net/rapid"

	"github.com/dealbridge/dealbridge/domain"
)

const dealID = "7d3c9a8e-8f1e-4a55-9b41-3b1f0f1c2d3e"

func newExampleDeal(t *testing.T, lines ...domain.Line) *domain.Deal {
	t.Helper()
	if len(lines) == 0 {
		lines = []domain.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 2, UnitPrice: "495.00"}}
	}
	d, _, err := domain.NewDeal(dealID, domain.Customer{ID: "C-1", Name: "Globex"}, "USD", lines)
	if err != nil {
		t.Fatalf("NewDeal: %v", err)
	}
	return d
}

func TestNewDealValidation(t *testing.T) {
	t.Parallel()
	ok := domain.Line{SKU: "SKU-1", Quantity: 1, UnitPrice: "1.00"}
	tests := []struct {
		name     string
		customer domain.Customer
		currency string
		lines    []domain.Line
		field    string
	}{
		{"missing customer id", domain.Customer{Name: "X"}, "USD", []domain.Line{ok}, "customer.id"},
		{"blank customer name", domain.Customer{ID: "C-1", Name: "  "}, "USD", []domain.Line{ok}, "customer.name"},
		{"unknown currency", domain.Customer{ID: "C-1", Name: "X"}, "XXX", []domain.Line{ok}, "currency"},
		{"lowercase currency", domain.Customer{ID: "C-1", Name: "X"}, "usd", []domain.Line{ok}, "currency"},
		{"no lines", domain.Customer{ID: "C-1", Name: "X"}, "USD", nil, "lines"},
		{"bad sku", domain.Customer{ID: "C-1", Name: "X"}, "USD", []domain.Line{{SKU: "a b", Quantity: 1, UnitPrice: "1"}}, "lines[0].sku"},
		{"zero quantity", domain.Customer{ID: "C-1", Name: "X"}, "USD", []domain.Line{ok, {SKU: "S", Quantity: 0, UnitPrice: "1"}}, "lines[1].quantity"},
		{"float-looking price", domain.Customer{ID: "C-1", Name: "X"}, "USD", []domain.Line{{SKU: "S", Quantity: 1, UnitPrice: "1e3"}}, "lines[0].unit_price"},
		{"negative price", domain.Customer{ID: "C-1", Name: "X"}, "USD", []domain.Line{{SKU: "S", Quantity: 1, UnitPrice: "-1.00"}}, "lines[0].unit_price"},
		{"too many decimals", domain.Customer{ID: "C-1", Name: "X"}, "USD", []domain.Line{{SKU: "S", Quantity: 1, UnitPrice: "1.001"}}, "lines[0].unit_price"},
		{"decimals for JPY", domain.Customer{ID: "C-1", Name: "X"}, "JPY", []domain.Line{{SKU: "S", Quantity: 1, UnitPrice: "100.5"}}, "lines[0].unit_price"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, _, err := domain.NewDeal(dealID, tt.customer, tt.currency, tt.lines)
			var verr *domain.ValidationError
			if !errors.As(err, &verr) {
				t.Fatalf("err = %v, want a ValidationError", err)
			}
			if verr.Field != tt.field {
				t.Fatalf("field = %q, want %q (%v)", verr.Field, tt.field, err)
			}
		})
	}
}

func TestNewDealTotalAndEvent(t *testing.T) {
	t.Parallel()
	_, ch, err := domain.NewDeal(dealID, domain.Customer{ID: "C-1", Name: "Globex"}, "USD", []domain.Line{
		{SKU: "SKU-1", Quantity: 2, UnitPrice: "495.00"}, {SKU: "SKU-2", Quantity: 3, UnitPrice: "0.10"},
	})
	if err != nil {
		t.Fatal(err)
	}
	ev := ch.Events[0].(domain.DealCreated)
	if ev.Total != "990.30" || ch.ExpectedVersion != 0 || ch.StreamID != "deal-"+dealID {
		t.Fatalf("got %+v %+v", ev, ch)
	}
}

func TestCloseWonAllocatesAndKeys(t *testing.T) {
	t.Parallel()
	d := newExampleDeal(t,
		domain.Line{SKU: "B", Quantity: 2, UnitPrice: "1.00"},
		domain.Line{SKU: "A", Quantity: 1, UnitPrice: "1.00"},
		domain.Line{SKU: "B", Quantity: 3, UnitPrice: "1.00"})
	stock := map[string]domain.Stock{"A": {SKU: "A", Available: 1, Version: 4}, "B": {SKU: "B", Available: 5, Version: 1}}
	changes, err := d.Close(domain.OutcomeWon, nil, stock)
	if err != nil {
		t.Fatal(err)
	}
	if len(changes) != 3 {
		t.Fatalf("changes = %d, want deal + 2 inventory", len(changes))
	}
	won := changes[0].Events[0].(domain.DealWon)
	if won.CloseVersion != 2 || won.IdempotencyKey != dealID+":2" || won.PreviousStatus != domain.StatusOpen {
		t.Fatalf("won = %+v", won)
	}
	// Inventory changes come in SKU order with the stock's version.
	if changes[1].StreamID != "inventory-A" || changes[1].ExpectedVersion != 4 ||
		changes[2].StreamID != "inventory-B" || changes[2].Events[0].(domain.InventoryAllocated).Quantity != 5 {
		t.Fatalf("inventory changes = %+v", changes[1:])
	}
}

func TestCloseRefusals(t *testing.T) {
	t.Parallel()
	t.Run("insufficient stock", func(t *testing.T) {
		d := newExampleDeal(t)
		_, err := d.Close(domain.OutcomeWon, nil, map[string]domain.Stock{"SKU-1": {Available: 1}})
		var serr *domain.InsufficientStockError
		if !errors.As(err, &serr) || serr.Requested != 2 || serr.Available != 1 {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("unknown sku has no stock", func(t *testing.T) {
		d := newExampleDeal(t)
		_, err := d.Close(domain.OutcomeWon, nil, nil)
		if !errors.As(err, new(*domain.InsufficientStockError)) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("version conflict", func(t *testing.T) {
		d := newExampleDeal(t)
		v := 7
		_, err := d.Close(domain.OutcomeLost, &v, nil)
		if !errors.Is(err, domain.ErrVersionConflict) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("close twice", func(t *testing.T) {
		d := newExampleDeal(t)
		ch, err := d.Close(domain.OutcomeLost, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		d.Apply(ch[0].Events...)
		_, err = d.Close(domain.OutcomeWon, nil, map[string]domain.Stock{"SKU-1": {Available: 9}})
		var terr *domain.TransitionError
		if !errors.As(err, &terr) || terr.From != domain.StatusLost {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("bad outcome", func(t *testing.T) {
		d := newExampleDeal(t)
		_, err := d.Close("maybe", nil, nil)
		if !errors.As(err, new(*domain.ValidationError)) {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestRecordInvoiceIsIdempotent(t *testing.T) {
	t.Parallel()
	d := newExampleDeal(t)
	if _, err := d.RecordInvoice("k", "INV-1", 1); err == nil {
		t.Fatal("an open deal must not accept an invoice")
	}
	ch, err := d.Close(domain.OutcomeWon, nil, map[string]domain.Stock{"SKU-1": {Available: 2}})
	if err != nil {
		t.Fatal(err)
	}
	d.Apply(ch[0].Events...)
	if _, err := d.RecordInvoice(dealID+":9", "INV-1", 1); err == nil {
		t.Fatal("an invoice for another close must be refused")
	}
	c, err := d.RecordInvoice(d.InvoiceKey(), "INV-1", 1)
	if err != nil || c == nil {
		t.Fatalf("first record: %v %v", c, err)
	}
	d.Apply(c.Events...)
	if d.Status() != domain.StatusInvoiced || d.InvoiceNumber() != "INV-1" {
		t.Fatalf("status %s invoice %s", d.Status(), d.InvoiceNumber())
	}
	again, err := d.RecordInvoice(d.InvoiceKey(), "INV-1", 1)
	if err != nil || again != nil {
		t.Fatalf("second record must be a no-op, got %v %v", again, err)
	}
}

func TestRehydrateEqualsFold(t *testing.T) {
	t.Parallel()
	d := newExampleDeal(t)
	ch, _ := d.Close(domain.OutcomeWon, nil, map[string]domain.Stock{"SKU-1": {Available: 2}})
	_, created, _ := domain.NewDeal(dealID, domain.Customer{ID: "C-1", Name: "Globex"}, "USD",
		[]domain.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 2, UnitPrice: "495.00"}})
	r, err := domain.RehydrateDeal(append(created.Events, ch[0].Events...))
	if err != nil {
		t.Fatal(err)
	}
	if r.Status() != domain.StatusWon || r.Version() != 2 || r.InvoiceKey() != dealID+":2" || r.Total() != "990.00" {
		t.Fatalf("rehydrated %s v%d %s %s", r.Status(), r.Version(), r.InvoiceKey(), r.Total())
	}
}

func TestDecodeEventRoundTripAndRefusals(t *testing.T) {
	t.Parallel()
	if _, err := domain.DecodeEvent("Nope", 1, []byte(`{}`)); err == nil {
		t.Fatal("unknown type must fail")
	}
	if _, err := domain.DecodeEvent(domain.TypeDealWon, 99, []byte(`{}`)); err == nil {
		t.Fatal("future schema version must fail")
	}
	e, err := domain.DecodeEvent(domain.TypeDealWon, 1, []byte(`{"deal_id":"x","close_version":3,"idempotency_key":"x:3"}`))
	if err != nil || e.(domain.DealWon).CloseVersion != 3 {
		t.Fatalf("%v %v", e, err)
	}
}

// The total of a deal is the exact decimal sum of quantity × unit price,
// rendered with the currency's fraction digits.
func TestTotalProperty(t *testing.T) {
	t.Parallel()
	rapid.Check(t, func(t *rapid.T) {
		n := rapid.IntRange(1, 10).Draw(t, "lines")
		var lines []domain.Line
		want := decimal.Zero
		for i := 0; i < n; i++ {
			cents := rapid.Int64Range(0, 10_000_000).Draw(t, "cents")
			q := rapid.Int64Range(1, 1000).Draw(t, "qty")
			p := decimal.New(cents, -2)
			lines = append(lines, domain.Line{SKU: "S", Quantity: q, UnitPrice: p.StringFixed(2)})
			want = want.Add(p.Mul(decimal.NewFromInt(q)))
		}
		_, ch, err := domain.NewDeal(dealID, domain.Customer{ID: "C", Name: "N"}, "EUR", lines)
		if err != nil {
			t.Fatal(err)
		}
		if got := ch.Events[0].(domain.DealCreated).Total; got != want.StringFixed(2) {
			t.Fatalf("total %s, want %s", got, want.StringFixed(2))
		}
	})
}

func TestRevertReleasesAndIsIdempotent(t *testing.T) {
	t.Parallel()
	d := newExampleDeal(t)
	stock := map[string]domain.Stock{"SKU-1": {SKU: "SKU-1", Available: 2, Version: 3}}
	if _, err := d.Revert("x", "r", stock); err == nil {
		t.Fatal("an open deal cannot be reverted")
	}
	ch, _ := d.Close(domain.OutcomeWon, nil, stock)
	d.Apply(ch[0].Events...)
	if _, err := d.Revert("other-key", "r", stock); err == nil {
		t.Fatal("revert must name the current close")
	}
	rv, err := d.Revert(d.InvoiceKey(), "ERP rejected", map[string]domain.Stock{"SKU-1": {Version: 4}})
	if err != nil || len(rv) != 2 {
		t.Fatalf("revert: %v %v", rv, err)
	}
	if rel := rv[1].Events[0].(domain.InventoryReleased); rel.Quantity != 2 || rv[1].ExpectedVersion != 4 {
		t.Fatalf("release %+v", rv[1])
	}
	d.Apply(rv[0].Events...)
	if d.Status() != domain.StatusReverted {
		t.Fatalf("status %s", d.Status())
	}
	again, err := d.Revert(d.InvoiceKey(), "again", nil)
	if err != nil || again != nil {
		t.Fatalf("second revert must be a no-op: %v %v", again, err)
	}
	// An invoiced deal is never reverted.
	d2 := newExampleDeal(t)
	ch, _ = d2.Close(domain.OutcomeWon, nil, stock)
	d2.Apply(ch[0].Events...)
	inv, _ := d2.RecordInvoice(d2.InvoiceKey(), "INV-9", 1)
	d2.Apply(inv.Events...)
	if _, err := d2.Revert(d2.InvoiceKey(), "late", stock); err == nil {
		t.Fatal("an invoiced deal must not be reverted")
	}
}
