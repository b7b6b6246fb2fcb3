package domain

import (
	"errors"
	"fmt"
	"time"
)

// ErrorClass is the taxonomy every ERP failure is mapped to. It decides what
// the saga does next, so the mapping lives at the adapter edge and the
// decision lives here.
type ErrorClass string

const (
	// ErrorTransient: the request certainly did not take effect (5xx,
	// connection refused, timeout before the request was sent). Retry with
	// the same idempotency key after a backoff.
	ErrorTransient ErrorClass = "transient"
	// ErrorRateLimited: the ERP asked us to slow down (429), possibly with a
	// Retry-After. Retry no earlier than it says.
	ErrorRateLimited ErrorClass = "rate_limited"
	// ErrorPermanent: the ERP rejected the payload (4xx validation). Retrying
	// the same payload cannot succeed: compensate and dead-letter.
	ErrorPermanent ErrorClass = "permanent"
	// ErrorAmbiguous: the request may have reached the ERP (timeout or reset
	// after sending). Look the invoice up by key before deciding anything.
	ErrorAmbiguous ErrorClass = "ambiguous"
)

// ERPError is an ERP call failure with its class. Adapters return it; the
// saga reads Class and RetryAfter.
type ERPError struct {
	Class      ErrorClass
	StatusCode int           // HTTP status when there was a response, else 0
	RetryAfter time.Duration // from Retry-After, 0 when absent
	Message    string        // what the ERP said, kept for the dead letter
	Err        error         // underlying cause, may be nil
}

func (e *ERPError) Error() string {
	s := "erp " + string(e.Class)
	if e.StatusCode != 0 {
		s += fmt.Sprintf(" (HTTP %d)", e.StatusCode)
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *ERPError) Unwrap() error { return e.Err }

// ClassOf returns the class of err, or ErrorTransient when err carries none:
// an unknown failure is retried, never silently dropped.
func ClassOf(err error) ErrorClass {
	var e *ERPError
	if errors.As(err, &e) {
		return e.Class
	}
	return ErrorTransient
}
