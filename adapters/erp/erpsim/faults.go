package erpsim

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Faults is the simulator's fault plan. It is set by Config.Faults at start
// and replaced at runtime with PUT /_sim/faults (the whole plan; read it
// with GET /_sim/faults). JSON field names are given in brackets.
//
// The request-level faults (ErrorRate, RateLimitRate, HangRate,
// DropAfterCommitRate, RejectCustomers) apply to POST /invoices only, so that
// lookups stay usable while creates misbehave. DownUntil and Latency apply to
// every /invoices endpoint. /healthz and /_sim/* are never faulted.
//
// Order of application to a POST: down, latency, request checks (key, JSON
// syntax), rate limit, error, hang, idempotency (replay / 409 / 422),
// validation, rejected customer, create, drop. Every POST that reaches the
// rate-limit step draws one number per rate fault from the seeded generator,
// always in the same order, so a given Config.Seed and request sequence
// reproduce the same faults whatever the rates are (concurrent requests
// draw in arrival order, which the OS decides).
type Faults struct {
	// ErrorRate [error_rate], 0..1: answer 500 or 503 without creating.
	ErrorRate float64 `json:"error_rate"`
	// RateLimitRate [rate_limit_rate], 0..1: answer 429 with
	// "Retry-After: RetryAfterSeconds" without creating.
	RateLimitRate float64 `json:"rate_limit_rate"`
	// RetryAfterSeconds [retry_after_seconds] is the Retry-After sent with
	// 429 answers (0 is sent as "0").
	RetryAfterSeconds int `json:"retry_after_seconds"`
	// RejectCustomers [reject_customers]: invoices for these customer ids
	// are refused with 422 "unknown customer <id>" (a permanent error).
	RejectCustomers []string `json:"reject_customers"`
	// Latency [latency, a Go duration string such as "250ms"] is added
	// before answering.
	Latency time.Duration `json:"-"`
	// HangRate [hang_rate], 0..1: hold the request until the client gives
	// up (its connection closes) or the simulator is closed; create nothing
	// and write nothing.
	HangRate float64 `json:"hang_rate"`
	// DropAfterCommitRate [drop_after_commit_rate], 0..1: create the
	// invoice durably, then close the connection without writing a response
	// (the lost-response case, F9). Replays are not dropped.
	DropAfterCommitRate float64 `json:"drop_after_commit_rate"`
	// DownUntil [down_until, RFC 3339]: answer 503 with a Retry-After until
	// this instant. Zero (omitted) means up.
	DownUntil time.Time `json:"down_until,omitzero"`
}

// faultsJSON carries Latency as a duration string.
type faultsJSON struct {
	*faultsAlias
	Latency string `json:"latency"`
}

type faultsAlias Faults

// MarshalJSON encodes Latency as a Go duration string.
func (f Faults) MarshalJSON() ([]byte, error) {
	a := faultsAlias(f)
	return json.Marshal(faultsJSON{faultsAlias: &a, Latency: f.Latency.String()})
}

// UnmarshalJSON decodes Latency from a Go duration string ("" means 0) and
// rejects unknown fields.
func (f *Faults) UnmarshalJSON(b []byte) error {
	var a faultsAlias
	v := faultsJSON{faultsAlias: &a}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields() // a typo in a fault plan must not pass silently
	if err := dec.Decode(&v); err != nil {
		return err
	}
	if v.Latency != "" {
		d, err := time.ParseDuration(v.Latency)
		if err != nil {
			return fmt.Errorf("latency: %w", err)
		}
		a.Latency = d
	}
	*f = Faults(a)
	return nil
}

// Validate reports the first invalid field of f.
func (f Faults) Validate() error {
	for _, r := range []struct {
		name string
		v    float64
	}{
		{"error_rate", f.ErrorRate}, {"rate_limit_rate", f.RateLimitRate},
		{"hang_rate", f.HangRate}, {"drop_after_commit_rate", f.DropAfterCommitRate},
	} {
		if math.IsNaN(r.v) || r.v < 0 || r.v > 1 {
			return fmt.Errorf("%s: %v is not within 0..1", r.name, r.v)
		}
	}
	if f.RetryAfterSeconds < 0 {
		return fmt.Errorf("retry_after_seconds: %d is negative", f.RetryAfterSeconds)
	}
	if f.Latency < 0 {
		return fmt.Errorf("latency: %v is negative", f.Latency)
	}
	return nil
}

func (f Faults) clone() Faults {
	f.RejectCustomers = slices.Clone(f.RejectCustomers)
	return f
}

// RegisterFlags binds c to command-line flags: --store, --seed, --error-rate,
// --rate-limit-rate, --retry-after (seconds, default 1), --reject-customer
// (repeatable), --latency, --hang-rate, --drop-after-commit-rate and
// --down-until (RFC 3339). Defaults are c's current values.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	if c.Faults.RetryAfterSeconds == 0 {
		c.Faults.RetryAfterSeconds = 1
	}
	f := &c.Faults
	fs.StringVar(&c.StorePath, "store", c.StorePath, "JSON-lines file holding invoices, idempotency records and the ledger (empty: in memory)")
	fs.Int64Var(&c.Seed, "seed", c.Seed, "seed of the fault generator (runs reproduce)")
	fs.Float64Var(&f.ErrorRate, "error-rate", f.ErrorRate, "fraction of creates answered 500/503 without creating")
	fs.Float64Var(&f.RateLimitRate, "rate-limit-rate", f.RateLimitRate, "fraction of creates answered 429")
	fs.IntVar(&f.RetryAfterSeconds, "retry-after", f.RetryAfterSeconds, "Retry-After seconds sent with 429")
	fs.Func("reject-customer", "customer id whose invoices are rejected with 422 (repeatable)", func(s string) error {
		if s = strings.TrimSpace(s); s == "" {
			return fmt.Errorf("empty customer id")
		}
		f.RejectCustomers = append(f.RejectCustomers, s)
		return nil
	})
	fs.DurationVar(&f.Latency, "latency", f.Latency, "latency added to every /invoices answer")
	fs.Float64Var(&f.HangRate, "hang-rate", f.HangRate, "fraction of creates held until the client gives up")
	fs.Float64Var(&f.DropAfterCommitRate, "drop-after-commit-rate", f.DropAfterCommitRate, "fraction of creates committed whose response is dropped")
	fs.Func("down-until", "answer 503 until this RFC 3339 time", func(s string) error {
		t, err := time.Parse(time.RFC3339, s)
		if err != nil {
			return err
		}
		f.DownUntil = t
		return nil
	})
}
