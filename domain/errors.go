package domain

import (
	"errors"
	"fmt"
)

var (
	// ErrNotFound: the deal, inventory item or event stream does not exist.
	ErrNotFound = errors.New("not found")
	// ErrVersionConflict: the caller's expected version is not the current
	// one; reload and retry.
	ErrVersionConflict = errors.New("version conflict")
)

// ValidationError names the field that is wrong and why. The HTTP adapter
// turns it into a 422 problem whose body names the field.
type ValidationError struct {
	Field  string
	Reason string
}

func (e *ValidationError) Error() string { return e.Field + ": " + e.Reason }

func invalid(field, format string, args ...any) error {
	return &ValidationError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// TransitionError: the command is not allowed in the deal's current status.
type TransitionError struct {
	From   Status
	Action string
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("cannot %s a deal that is %s", e.Action, e.From)
}

// InsufficientStockError: closing the deal would allocate more than is
// available. Nothing is changed.
type InsufficientStockError struct {
	SKU       string
	Requested int64
	Available int64
}

func (e *InsufficientStockError) Error() string {
	return fmt.Sprintf("insufficient stock for %s: requested %d, available %d", e.SKU, e.Requested, e.Available)
}

// ConflictError wraps ErrVersionConflict with the versions involved.
type ConflictError struct {
	Stream   string
	Expected int
	Actual   int
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("version conflict on %s: expected %d, actual %d", e.Stream, e.Expected, e.Actual)
}

func (e *ConflictError) Is(target error) bool { return target == ErrVersionConflict }
