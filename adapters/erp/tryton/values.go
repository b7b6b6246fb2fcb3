package tryton

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"github.com/shopspring/decimal"
)

// Tryton's JSON-RPC tags typed values: {"__class__": "Decimal", "decimal":
// "12.50"}, {"__class__": "datetime", "year": …}. Amounts travel as
// Decimal objects, never as JSON floats (a float such as 10.1 is rejected
// for exceeding the field's digits, and binary floats are not money).

// decimalValue is what Tryton reads as a Python Decimal.
func decimalValue(d decimal.Decimal) map[string]any {
	return map[string]any{"__class__": "Decimal", "decimal": d.String()}
}

// tDecimal decodes a Decimal object, a decimal string or a JSON number
// (null: zero).
type tDecimal struct{ decimal.Decimal }

func (t *tDecimal) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if string(b) == "null" {
		t.Decimal = decimal.Zero
		return nil
	}
	var s string
	switch b[0] {
	case '{':
		var o struct {
			Class   string `json:"__class__"`
			Decimal string `json:"decimal"`
		}
		if err := json.Unmarshal(b, &o); err != nil {
			return err
		}
		if o.Class != "Decimal" {
			return fmt.Errorf("tryton: %s where a Decimal was expected", o.Class)
		}
		s = o.Decimal
	case '"':
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
	default:
		s = string(b)
	}
	d, err := decimal.NewFromString(s)
	if err != nil {
		return fmt.Errorf("tryton: bad decimal %q: %w", s, err)
	}
	t.Decimal = d
	return nil
}

// tDateTime decodes a datetime object (Tryton stores UTC) or null.
type tDateTime struct{ time.Time }

func (t *tDateTime) UnmarshalJSON(b []byte) error {
	if string(bytes.TrimSpace(b)) == "null" {
		t.Time = time.Time{}
		return nil
	}
	var o struct {
		Class                                  string `json:"__class__"`
		Year, Month, Day, Hour, Minute, Second int
		Microsecond                            int
	}
	if err := json.Unmarshal(b, &o); err != nil {
		return err
	}
	if o.Class != "datetime" && o.Class != "date" {
		return fmt.Errorf("tryton: %s where a datetime was expected", o.Class)
	}
	t.Time = time.Date(o.Year, time.Month(o.Month), o.Day, o.Hour, o.Minute, o.Second, o.Microsecond*1000, time.UTC)
	return nil
}

// tID decodes a Many2One value: an id, or null (0).
type tID int64

func (t *tID) UnmarshalJSON(b []byte) error {
	if string(bytes.TrimSpace(b)) == "null" {
		*t = 0
		return nil
	}
	var n int64
	if err := json.Unmarshal(b, &n); err != nil {
		return err
	}
	*t = tID(n)
	return nil
}

// tString decodes a Char value: a string, or null/false ("").
type tString string

func (t *tString) UnmarshalJSON(b []byte) error {
	switch string(bytes.TrimSpace(b)) {
	case "null", "false":
		*t = ""
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	*t = tString(s)
	return nil
}

// one2ManyCreate is the One2Many command that creates records.
func one2ManyCreate(values ...map[string]any) []any {
	vs := make([]any, len(values))
	for i, v := range values {
		vs[i] = v
	}
	return []any{[]any{"create", vs}}
}

// idOf reads a Many2One value out of an on_change result (a JSON number
// decoded with UseNumber, or null).
func idOf(v any) (int64, bool) {
	switch n := v.(type) {
	case json.Number:
		i, err := n.Int64()
		return i, err == nil && i > 0
	case float64:
		return int64(n), n > 0
	case int64:
		return n, n > 0
	}
	return 0, false
}

// idsOf reads a list of ids (a Many2Many value such as taxes).
func idsOf(v any) []int64 {
	list, _ := v.([]any)
	var out []int64
	for _, x := range list {
		if id, ok := idOf(x); ok {
			out = append(out, id)
		}
	}
	return out
}
