package domain

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/wI2L/jsondiff"
)

// Dead-letter states.
const (
	DLStateOpen       = "open"       // waiting for an operator
	DLStateReinjected = "reinjected" // republished; the saga is running again
	DLStateDiscarded  = "discarded"  // an operator gave up on it (terminal)
	DLStateResolved   = "resolved"   // the re-injected message succeeded (terminal)
)

// Event types of operator actions on dead letters and alerts.
const (
	TypeDeadLetterEdited     = "DeadLetterEdited"
	TypeDeadLetterApproved   = "DeadLetterApproved"
	TypeDeadLetterReinjected = "DeadLetterReinjected"
	TypeDeadLetterDiscarded  = "DeadLetterDiscarded"
	TypeDeadLetterResolved   = "DeadLetterResolved"
	TypeDeadLetterReopened   = "DeadLetterReopened"
	TypeAlertAcknowledged    = "AlertAcknowledged"
	TypeAlertResolved        = "AlertResolved"
	TypeDealReinstated       = "DealReinstated"
	TypeInvoiceSagaResumed   = "InvoiceSagaResumed"
)

// Errors of dead-letter operations.
var (
	// ErrStateConflict: the entry is not in a state that allows the action
	// (re-injecting a discarded or already re-injected entry, say).
	ErrStateConflict = errors.New("state conflict")
	// ErrApprovalRequired: the latest revision changed money fields and
	// waits for a second operator's approval.
	ErrApprovalRequired = errors.New("approval required")
	// ErrSelfApproval: makers cannot check their own edits.
	ErrSelfApproval = errors.New("an edit cannot be approved by its own author")
	// ErrReinjectLimit: the loop guard — the entry was re-injected too often.
	ErrReinjectLimit = errors.New("re-inject limit reached")
)

// StateError says why an action is refused in the entry's current state.
type StateError struct {
	ID, State, Action string
	Err               error
}

func (e *StateError) Error() string {
	return fmt.Sprintf("cannot %s dead letter %s: it is %s", e.Action, e.ID, e.State)
}

func (e *StateError) Unwrap() error { return e.Err }

// DeadLetterEdited stores a new revision of the payload, with the RFC 6902
// JSON Patch from the original payload to it.
type DeadLetterEdited struct {
	DeadLetterID  string          `json:"dead_letter_id"`
	Revision      int             `json:"revision"`
	Payload       json.RawMessage `json:"payload"`
	Patch         json.RawMessage `json:"patch"`
	Reason        string          `json:"reason"`
	Actor         string          `json:"actor"`
	MoneyChanged  bool            `json:"money_changed"`
	NeedsApproval bool            `json:"needs_approval"`
}

// DeadLetterApproved is the checker's approval of a revision.
type DeadLetterApproved struct {
	DeadLetterID string `json:"dead_letter_id"`
	Revision     int    `json:"revision"`
	Actor        string `json:"actor"`
}

// DeadLetterReinjected republishes revision Revision of the payload.
type DeadLetterReinjected struct {
	DeadLetterID   string `json:"dead_letter_id"`
	Revision       int    `json:"revision"`
	Actor          string `json:"actor"`
	Reason         string `json:"reason"`
	IdempotencyKey string `json:"idempotency_key,omitempty"`
	NewKey         bool   `json:"new_key"`
	OperationID    string `json:"operation_id,omitempty"`
	Count          int    `json:"count"`
}

// DeadLetterDiscarded gives up on an entry.
type DeadLetterDiscarded struct {
	DeadLetterID string `json:"dead_letter_id"`
	Actor        string `json:"actor"`
	Reason       string `json:"reason"`
}

// DeadLetterResolved: the re-injected message succeeded.
type DeadLetterResolved struct {
	DeadLetterID  string `json:"dead_letter_id"`
	InvoiceNumber string `json:"invoice_number,omitempty"`
}

// DeadLetterReopened: the re-injected message failed again.
type DeadLetterReopened struct {
	DeadLetterID  string    `json:"dead_letter_id"`
	Reason        string    `json:"reason"`
	ErrorClass    string    `json:"error_class"`
	Attempts      int       `json:"attempts"`
	LastFailureAt time.Time `json:"last_failure_at"`
}

// AlertAcknowledged: an operator has seen the alert.
type AlertAcknowledged struct {
	AlertID string `json:"alert_id"`
	Actor   string `json:"actor"`
}

// AlertResolved closes an alert.
type AlertResolved struct {
	AlertID string `json:"alert_id"`
	Actor   string `json:"actor"`
	Reason  string `json:"reason"`
}

// DealReinstated takes a reverted deal back to won for a re-injected
// invoice request: the saga runs again (the inventory is allocated again by
// InventoryAllocated events in the same transaction).
type DealReinstated struct {
	DealID         string `json:"deal_id"`
	IdempotencyKey string `json:"idempotency_key"`
	PreviousKey    string `json:"previous_key"`
	Reason         string `json:"reason"`
}

// InvoiceSagaResumed restarts a saga with a fresh retry budget.
type InvoiceSagaResumed struct {
	DealID         string `json:"deal_id"`
	IdempotencyKey string `json:"idempotency_key"`
	DeadLetterID   string `json:"dead_letter_id"`
	OperationID    string `json:"operation_id,omitempty"`
}

func (DeadLetterEdited) EventType() string     { return TypeDeadLetterEdited }
func (DeadLetterApproved) EventType() string   { return TypeDeadLetterApproved }
func (DeadLetterReinjected) EventType() string { return TypeDeadLetterReinjected }
func (DeadLetterDiscarded) EventType() string  { return TypeDeadLetterDiscarded }
func (DeadLetterResolved) EventType() string   { return TypeDeadLetterResolved }
func (DeadLetterReopened) EventType() string   { return TypeDeadLetterReopened }
func (AlertAcknowledged) EventType() string    { return TypeAlertAcknowledged }
func (AlertResolved) EventType() string        { return TypeAlertResolved }
func (DealReinstated) EventType() string       { return TypeDealReinstated }
func (InvoiceSagaResumed) EventType() string   { return TypeInvoiceSagaResumed }

// Revision is one version of a dead letter's payload; revision 0 is the
// payload as it failed.
type Revision struct {
	Number        int             `json:"revision"`
	Payload       json.RawMessage `json:"payload"`
	Patch         json.RawMessage `json:"patch,omitempty"`
	Reason        string          `json:"reason,omitempty"`
	Actor         string          `json:"actor,omitempty"`
	MoneyChanged  bool            `json:"money_changed"`
	NeedsApproval bool            `json:"needs_approval"`
	ApprovedBy    string          `json:"approved_by,omitempty"`
}

// DeadLetter is the dead-letter aggregate, folded from its stream.
type DeadLetter struct {
	ID        string
	State     string
	DealID    string
	Key       string
	Topic     string
	Handler   string
	Revisions []Revision
	Reinjects int
	Version   int
}

// RehydrateDeadLetter folds a dead letter's stream.
func RehydrateDeadLetter(events []Event) (*DeadLetter, error) {
	if len(events) == 0 {
		return nil, ErrNotFound
	}
	first, ok := events[0].(MessageDeadLettered)
	if !ok {
		return nil, fmt.Errorf("dead-letter stream starts with %s", events[0].EventType())
	}
	d := &DeadLetter{ID: first.DeadLetterID, DealID: first.DealID, Key: first.IdempotencyKey, Topic: first.Topic,
		Handler: first.Handler, State: DLStateOpen}
	d.Revisions = []Revision{{Number: 0, Payload: first.RawPayload()}}
	d.Version = 1
	for _, e := range events[1:] {
		d.Apply(e)
	}
	return d, nil
}

// Apply folds one event into the dead letter.
func (d *DeadLetter) Apply(e Event) {
	d.Version++
	switch e := e.(type) {
	case DeadLetterEdited:
		d.Revisions = append(d.Revisions, Revision{Number: e.Revision, Payload: e.Payload, Patch: e.Patch,
			Reason: e.Reason, Actor: e.Actor, MoneyChanged: e.MoneyChanged, NeedsApproval: e.NeedsApproval})
	case DeadLetterApproved:
		for i := range d.Revisions {
			if d.Revisions[i].Number == e.Revision {
				d.Revisions[i].ApprovedBy = e.Actor
			}
		}
	case DeadLetterReinjected:
		d.State = DLStateReinjected
		d.Reinjects = e.Count
		if e.IdempotencyKey != "" {
			d.Key = e.IdempotencyKey
		}
	case DeadLetterDiscarded:
		d.State = DLStateDiscarded
	case DeadLetterResolved:
		d.State = DLStateResolved
	case DeadLetterReopened:
		d.State = DLStateOpen
	}
}

// Latest returns the latest revision.
func (d *DeadLetter) Latest() Revision { return d.Revisions[len(d.Revisions)-1] }

// accepted returns the index of the latest revision whose money fields are
// accepted: one that needed no approval or was approved (revision 0, the
// payload as it failed, always is).
func (d *DeadLetter) accepted() int {
	for i := len(d.Revisions) - 1; i > 0; i-- {
		if r := d.Revisions[i]; !r.NeedsApproval || r.ApprovedBy != "" {
			return i
		}
	}
	return 0
}

func (d *DeadLetter) refuse(action string, err error) error {
	return &StateError{ID: d.ID, State: d.State, Action: action, Err: err}
}

// Edit stores payload as a new revision. validate checks it against the
// message's schema; reason is required. With makerChecker, a change of
// money fields (currency, lines, total) needs another operator's approval
// before the entry can be re-injected.
func (d *DeadLetter) Edit(payload []byte, reason, actor string, makerChecker bool, validate func([]byte) error) (Change, error) {
	if d.State != DLStateOpen {
		return Change{}, d.refuse("edit", ErrStateConflict)
	}
	if strings.TrimSpace(reason) == "" {
		return Change{}, invalid("reason", "is required")
	}
	if strings.TrimSpace(actor) == "" {
		return Change{}, invalid("actor", "is required")
	}
	if !json.Valid(payload) {
		return Change{}, invalid("payload", "is not valid JSON")
	}
	if validate != nil {
		if err := validate(payload); err != nil {
			return Change{}, err
		}
	}
	canon, err := canonical(payload)
	if err != nil {
		return Change{}, invalid("payload", "%v", err)
	}
	var pb json.RawMessage
	if json.Valid(d.Revisions[0].Payload) {
		patch, err := jsondiff.CompareJSON(d.Revisions[0].Payload, canon)
		if err != nil {
			return Change{}, fmt.Errorf("cannot diff the payload: %w", err)
		}
		if pb, err = json.Marshal(patch); err != nil {
			return Change{}, fmt.Errorf("cannot encode the patch: %w", err)
		}
		if patch == nil {
			pb = json.RawMessage("[]")
		}
	} else {
		// The original was not JSON (a poison message): the patch replaces
		// the whole document.
		pb, err = json.Marshal([]map[string]any{{"op": "replace", "path": "", "value": canon}})
		if err != nil {
			return Change{}, fmt.Errorf("cannot encode the patch: %w", err)
		}
	}
	// Money changes are measured against the last accepted revision, not
	// the latest: a later edit must not carry an unapproved money change
	// past the checker.
	money := moneyChanged(d.Revisions[d.accepted()].Payload, canon)
	ev := DeadLetterEdited{DeadLetterID: d.ID, Revision: d.Latest().Number + 1, Payload: canon, Patch: pb,
		Reason: reason, Actor: actor, MoneyChanged: money, NeedsApproval: money && makerChecker}
	return Change{StreamID: DeadLetterStream(d.ID), ExpectedVersion: d.Version, Events: []Event{ev}}, nil
}

// Approve approves the latest revision; its author cannot.
func (d *DeadLetter) Approve(actor string) (Change, error) {
	if d.State != DLStateOpen {
		return Change{}, d.refuse("approve", ErrStateConflict)
	}
	r := d.Latest()
	if !r.NeedsApproval || r.ApprovedBy != "" {
		return Change{}, &StateError{ID: d.ID, State: "not awaiting approval", Action: "approve", Err: ErrStateConflict}
	}
	if strings.TrimSpace(actor) == "" {
		return Change{}, invalid("actor", "is required")
	}
	// Every author of a revision since the last accepted one is a maker of
	// the change awaiting approval.
	for _, m := range d.Revisions[d.accepted()+1:] {
		if actor == m.Actor {
			return Change{}, ErrSelfApproval
		}
	}
	return Change{StreamID: DeadLetterStream(d.ID), ExpectedVersion: d.Version,
		Events: []Event{DeadLetterApproved{DeadLetterID: d.ID, Revision: r.Number, Actor: actor}}}, nil
}

// Reinject republishes the latest revision. The state guard (open only) is
// what makes concurrent re-injects end with one winner; maxReinjects is the
// loop guard (0: no limit).
func (d *DeadLetter) Reinject(actor, reason, key string, newKey bool, operationID string, maxReinjects int) (Change, error) {
	if d.State != DLStateOpen {
		return Change{}, d.refuse("re-inject", ErrStateConflict)
	}
	if strings.TrimSpace(reason) == "" {
		return Change{}, invalid("reason", "is required")
	}
	if strings.TrimSpace(actor) == "" {
		return Change{}, invalid("actor", "is required")
	}
	if r := d.Latest(); r.NeedsApproval && r.ApprovedBy == "" {
		return Change{}, fmt.Errorf("dead letter %s revision %d changes money fields: %w", d.ID, r.Number, ErrApprovalRequired)
	}
	if maxReinjects > 0 && d.Reinjects >= maxReinjects {
		return Change{}, fmt.Errorf("dead letter %s was re-injected %d times: %w", d.ID, d.Reinjects, ErrReinjectLimit)
	}
	ev := DeadLetterReinjected{DeadLetterID: d.ID, Revision: d.Latest().Number, Actor: actor, Reason: reason,
		IdempotencyKey: key, NewKey: newKey, OperationID: operationID, Count: d.Reinjects + 1}
	return Change{StreamID: DeadLetterStream(d.ID), ExpectedVersion: d.Version, Events: []Event{ev}}, nil
}

// Discard gives up on the entry.
func (d *DeadLetter) Discard(actor, reason string) (Change, error) {
	if d.State != DLStateOpen {
		return Change{}, d.refuse("discard", ErrStateConflict)
	}
	if strings.TrimSpace(reason) == "" {
		return Change{}, invalid("reason", "is required")
	}
	if strings.TrimSpace(actor) == "" {
		return Change{}, invalid("actor", "is required")
	}
	return Change{StreamID: DeadLetterStream(d.ID), ExpectedVersion: d.Version,
		Events: []Event{DeadLetterDiscarded{DeadLetterID: d.ID, Actor: actor, Reason: reason}}}, nil
}

func canonical(b []byte) (json.RawMessage, error) {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

// moneyChanged reports whether currency, lines or total differ.
func moneyChanged(a, b []byte) bool {
	var x, y map[string]any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return true
	}
	for _, f := range []string{"currency", "lines", "total"} {
		if !reflect.DeepEqual(x[f], y[f]) {
			return true
		}
	}
	return false
}

// Reinstate takes a reverted deal back to won for a re-injected invoice
// request with key (the old key, or a new one), allocating its inventory
// again. stock is as for Close.
func (d *Deal) Reinstate(key, reason string, stock map[string]Stock) ([]Change, error) {
	if d.status != StatusReverted {
		return nil, &TransitionError{From: d.status, Action: "reinstate"}
	}
	var changes []Change
	changes = append(changes, Change{StreamID: DealStream(d.id), ExpectedVersion: d.version,
		Events: []Event{DealReinstated{DealID: d.id, IdempotencyKey: key, PreviousKey: d.invoiceKey, Reason: reason}}})
	for _, q := range d.Quantities() {
		s := stock[q.SKU]
		if s.Available < q.Quantity {
			return nil, &InsufficientStockError{SKU: q.SKU, Requested: q.Quantity, Available: s.Available}
		}
		changes = append(changes, Change{StreamID: InventoryStream(q.SKU), ExpectedVersion: s.Version,
			Events: []Event{InventoryAllocated{SKU: q.SKU, DealID: d.id, Quantity: q.Quantity}}})
	}
	return changes, nil
}

// ValidateInvoiceRequest checks an invoice request against its schema;
// errors name the field.
func ValidateInvoiceRequest(req InvoiceRequest) error {
	if req.DealID == "" {
		return invalid("deal_id", "is required")
	}
	base := IdempotencyKey(req.DealID, req.CloseVersion)
	if req.IdempotencyKey != base && !strings.HasPrefix(req.IdempotencyKey, base+":r") {
		return invalid("idempotency_key", "must be deal_id:close_version (or a re-inject key derived from it)")
	}
	_, ch, err := NewDeal(req.DealID, req.Customer, req.Currency, req.Lines)
	if err != nil {
		return err
	}
	if total := ch.Events[0].(DealCreated).Total; total != req.Total {
		return invalid("total", "is %s but the lines add up to %s", req.Total, total)
	}
	return nil
}
