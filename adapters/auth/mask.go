package auth

import (
	"bytes"
	"encoding/json"
	"strings"
	"unicode/utf8"
)

// MaskString hides a customer value from viewers, keeping its first
// character so that rows can still be told apart.
func MaskString(s string) string {
	if s == "" {
		return ""
	}
	r, _ := utf8.DecodeRuneInString(s)
	return string(r) + "•••"
}

// piiKeys name the object members whose whole value is customer data.
var piiKeys = map[string]bool{"customer": true, "customer_id": true, "customer_name": true}

// MaskJSON returns raw with every customer field masked: the value of any
// member named customer, customer_id or customer_name, and the value of any
// JSON Patch operation whose path is under /customer. Numbers keep their
// exact text. What is not JSON is returned as a placeholder.
func MaskJSON(raw json.RawMessage) json.RawMessage {
	if len(raw) == 0 {
		return raw
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return json.RawMessage(`"(hidden)"`)
	}
	out, err := json.Marshal(maskValue(v, false))
	if err != nil {
		return json.RawMessage(`"(hidden)"`)
	}
	return out
}

func maskValue(v any, all bool) any {
	switch x := v.(type) {
	case string:
		if all {
			return MaskString(x)
		}
		return x
	case []any:
		for i := range x {
			x[i] = maskValue(x[i], all)
		}
		return x
	case map[string]any:
		patchPII := false
		if p, ok := x["path"].(string); ok {
			if _, isOp := x["op"]; isOp && (p == "/customer" || strings.HasPrefix(p, "/customer/") || strings.HasPrefix(p, "/customer_")) {
				patchPII = true
			}
		}
		for k, val := range x {
			x[k] = maskValue(val, all || piiKeys[k] || (patchPII && k == "value"))
		}
		return x
	}
	return v
}

// MaskText hides each of values (customer ids and names, at least two
// characters long) wherever free text repeats them: ERP error messages and
// reasons quote the customer.
func MaskText(s string, values ...string) string {
	for _, v := range values {
		if len(v) >= 2 {
			s = strings.ReplaceAll(s, v, MaskString(v))
		}
	}
	return s
}

// CustomerValues returns the customer ids and names found in JSON documents
// (under a member named customer), for MaskText.
func CustomerValues(docs ...json.RawMessage) []string {
	seen := map[string]bool{}
	var out []string
	for _, raw := range docs {
		var v struct {
			Customer struct {
				ID   string `json:"id"`
				Name string `json:"name"`
			} `json:"customer"`
		}
		if json.Unmarshal(raw, &v) != nil {
			continue
		}
		for _, x := range []string{v.Customer.ID, v.Customer.Name} {
			if x != "" && !seen[x] {
				seen[x] = true
				out = append(out, x)
			}
		}
	}
	return out
}

// MaskJSONText is MaskText over the text of a JSON document, matching the
// values as JSON encodes them.
func MaskJSONText(raw json.RawMessage, values ...string) json.RawMessage {
	if len(raw) == 0 {
		return raw
	}
	s := string(raw)
	for _, v := range values {
		if len(v) < 2 {
			continue
		}
		ev, _ := json.Marshal(v)
		em, _ := json.Marshal(MaskString(v))
		s = strings.ReplaceAll(s, strings.Trim(string(ev), `"`), strings.Trim(string(em), `"`))
	}
	return json.RawMessage(s)
}
