package domain

import (
	"fmt"
	"regexp"

	"github.com/shopspring/decimal"
)

// currencies is the ISO 4217 set dealbridge accepts, with each currency's
// minor-unit exponent. An amount with more fraction digits than its currency
// allows is rejected rather than rounded: rounding revenue silently is how
// ledgers drift.
var currencies = map[string]int32{
	"AED": 2, "ARS": 2, "AUD": 2, "BGN": 2, "BRL": 2, "CAD": 2, "CHF": 2, "CLP": 0,
	"CNY": 2, "COP": 2, "CZK": 2, "DKK": 2, "EGP": 2, "EUR": 2, "GBP": 2, "HKD": 2,
	"HUF": 2, "IDR": 2, "ILS": 2, "INR": 2, "ISK": 0, "JPY": 0, "KRW": 0, "KWD": 3,
	"MXN": 2, "MYR": 2, "NOK": 2, "NZD": 2, "PHP": 2, "PLN": 2, "RON": 2, "SAR": 2,
	"SEK": 2, "SGD": 2, "THB": 2, "TRY": 2, "TWD": 2, "UAH": 2, "USD": 2, "VND": 0,
	"ZAR": 2,
}

var decimalRE = regexp.MustCompile(`^(0|[1-9][0-9]{0,14})(\.[0-9]{1,4})?$`)

// ParseAmount parses a non-negative decimal string such as "495.00" for the
// given currency. Floats, exponents, signs and thousands separators are
// refused.
func ParseAmount(s, currency string) (decimal.Decimal, error) {
	exp, ok := currencies[currency]
	if !ok {
		return decimal.Decimal{}, fmt.Errorf("unknown currency %q", currency)
	}
	if !decimalRE.MatchString(s) {
		return decimal.Decimal{}, fmt.Errorf("%q is not a decimal amount like \"495.00\"", s)
	}
	d, err := decimal.NewFromString(s)
	if err != nil {
		return decimal.Decimal{}, fmt.Errorf("%q is not a decimal amount: %w", s, err)
	}
	if -d.Exponent() > exp {
		return decimal.Decimal{}, fmt.Errorf("%q has more than %d fraction digits for %s", s, exp, currency)
	}
	return d, nil
}

// ValidCurrency reports whether code is an accepted ISO 4217 code.
func ValidCurrency(code string) bool {
	_, ok := currencies[code]
	return ok
}

// FormatAmount renders d with the currency's number of fraction digits.
func FormatAmount(d decimal.Decimal, currency string) string {
	return d.StringFixed(currencies[currency])
}
