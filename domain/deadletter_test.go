package domain_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/dealbridge/dealbridge/domain"
)

// Unit tests of the dead-letter aggregate: its state machine, revisions with
// JSON Patches against the original, the maker-checker rule, the loop guard;
// and of Deal.Reinstate and ValidateInvoiceRequest.

const dlID = "0b6c1f7e-3c55-4d0e-9a2b-6f2d8e1a9c41"

// invoiceReq is the invoice request of the example deal (deal_test.go).
func invoiceReq() domain.InvoiceRequest {
	return domain.InvoiceRequest{
		DealID: dealID, IdempotencyKey: dealID + ":2", CloseVersion: 2,
		Customer: domain.Customer{ID: "C-9", Name: "Globex"}, Currency: "USD",
		Lines: []domain.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 2, UnitPrice: "495.00"}},
		Total: "990.00",
	}
}

func payloadOf(t *testing.T, mutate func(*domain.InvoiceRequest)) []byte {
	t.Helper()
	r := invoiceReq()
	if mutate != nil {
		mutate(&r)
	}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// newDL folds a fresh dead letter holding payload.
func newDL(t *testing.T, payload []byte) *domain.DeadLetter {
	t.Helper()
	ev := domain.MessageDeadLettered{DeadLetterID: dlID, DealID: dealID, IdempotencyKey: dealID + ":2", MessageUUID: "m-1",
		Topic: "invoice-requests", Handler: "invoice-saga", Reason: "unknown customer C-9", ErrorClass: "permanent", Attempts: 1}
	ev.SetPayload(payload)
	dl, err := domain.RehydrateDeadLetter([]domain.Event{ev})
	if err != nil {
		t.Fatal(err)
	}
	if dl.State != domain.DLStateOpen || dl.Version != 1 || len(dl.Revisions) != 1 || dl.Revisions[0].Number != 0 {
		t.Fatalf("fresh dead letter = %+v", dl)
	}
	return dl
}

// commit checks that change targets dl's stream at its current version and
// folds it, as the store does after a successful append.
func commit(t *testing.T, dl *domain.DeadLetter, ch domain.Change) {
	t.Helper()
	if ch.StreamID != domain.DeadLetterStream(dl.ID) || ch.ExpectedVersion != dl.Version || len(ch.Events) != 1 {
		t.Fatalf("change %+v: want one event on %s at version %d", ch, domain.DeadLetterStream(dl.ID), dl.Version)
	}
	dl.Apply(ch.Events[0])
}

func mustEdit(t *testing.T, dl *domain.DeadLetter, payload []byte, actor string, makerChecker bool) domain.DeadLetterEdited {
	t.Helper()
	ch, err := dl.Edit(payload, "fix it", actor, makerChecker, nil)
	if err != nil {
		t.Fatalf("edit by %s: %v", actor, err)
	}
	commit(t, dl, ch)
	return ch.Events[0].(domain.DeadLetterEdited)
}

func mustReinject(t *testing.T, dl *domain.DeadLetter, max int) domain.DeadLetterReinjected {
	t.Helper()
	ch, err := dl.Reinject("bob", "customer fixed", dl.Key, false, "", max)
	if err != nil {
		t.Fatalf("reinject: %v", err)
	}
	commit(t, dl, ch)
	return ch.Events[0].(domain.DeadLetterReinjected)
}

func isStateConflict(err error) bool {
	var se *domain.StateError
	return errors.As(err, &se) && errors.Is(err, domain.ErrStateConflict)
}

func TestRehydrateDeadLetterRefusals(t *testing.T) {
	t.Parallel()
	if _, err := domain.RehydrateDeadLetter(nil); !errors.Is(err, domain.ErrNotFound) {
		t.Fatalf("empty stream: %v, want ErrNotFound", err)
	}
	if _, err := domain.RehydrateDeadLetter([]domain.Event{domain.DeadLetterDiscarded{DeadLetterID: dlID}}); err == nil {
		t.Fatal("a stream not starting with MessageDeadLettered must be refused")
	}
}

// TestDeadLetterStateMachine: every action in every state. Only an open
// entry can be edited, approved, re-injected or discarded; a re-injected
// entry is reopened by a new failure and resolved by success; discarded and
// resolved are terminal.
func TestDeadLetterStateMachine(t *testing.T) {
	t.Parallel()
	to := func(t *testing.T, state string) *domain.DeadLetter {
		dl := newDL(t, payloadOf(t, nil))
		switch state {
		case domain.DLStateOpen:
		case domain.DLStateReinjected:
			mustReinject(t, dl, 0)
		case domain.DLStateDiscarded:
			ch, err := dl.Discard("alice", "duplicate")
			if err != nil {
				t.Fatal(err)
			}
			commit(t, dl, ch)
		case domain.DLStateResolved:
			mustReinject(t, dl, 0)
			dl.Apply(domain.DeadLetterResolved{DeadLetterID: dlID, InvoiceNumber: "INV-1"})
		}
		if dl.State != state {
			t.Fatalf("state %s, want %s", dl.State, state)
		}
		return dl
	}
	actions := map[string]func(dl *domain.DeadLetter) (domain.Change, error){
		"edit": func(dl *domain.DeadLetter) (domain.Change, error) {
			return dl.Edit(payloadOf(t, func(r *domain.InvoiceRequest) { r.Customer.ID = "C-1" }), "fix", "alice", false, nil)
		},
		"reinject": func(dl *domain.DeadLetter) (domain.Change, error) {
			return dl.Reinject("bob", "go", dl.Key, false, "", 0)
		},
		"discard": func(dl *domain.DeadLetter) (domain.Change, error) { return dl.Discard("bob", "give up") },
	}
	for _, state := range []string{domain.DLStateOpen, domain.DLStateReinjected, domain.DLStateDiscarded, domain.DLStateResolved} {
		for name, act := range actions {
			t.Run(state+"/"+name, func(t *testing.T) {
				dl := to(t, state)
				v := dl.Version
				_, err := act(dl)
				if state == domain.DLStateOpen {
					if err != nil {
						t.Fatalf("%s of an open entry: %v", name, err)
					}
					return
				}
				if !isStateConflict(err) {
					t.Fatalf("%s of a %s entry: %v, want a *StateError wrapping ErrStateConflict", name, state, err)
				}
				if !strings.Contains(err.Error(), state) || !strings.Contains(err.Error(), dlID) {
					t.Errorf("error %q should name the entry and its state", err)
				}
				if dl.Version != v || dl.State != state {
					t.Errorf("a refused action changed the aggregate")
				}
			})
		}
	}
	t.Run("reopened entry can be re-injected again", func(t *testing.T) {
		dl := to(t, domain.DLStateReinjected)
		dl.Apply(domain.DeadLetterReopened{DeadLetterID: dlID, Reason: "again", ErrorClass: "permanent", Attempts: 1})
		if dl.State != domain.DLStateOpen {
			t.Fatalf("reopened: state %s", dl.State)
		}
		if ev := mustReinject(t, dl, 0); ev.Count != 2 {
			t.Fatalf("second re-inject count %d, want 2", ev.Count)
		}
	})
	t.Run("approve without a pending money edit", func(t *testing.T) {
		dl := to(t, domain.DLStateOpen)
		if _, err := dl.Approve("carol"); !isStateConflict(err) {
			t.Fatalf("approve with nothing to approve: %v, want a state conflict", err)
		}
	})
}

func TestDeadLetterActionsNeedReasonAndActor(t *testing.T) {
	t.Parallel()
	dl := newDL(t, payloadOf(t, nil))
	p := payloadOf(t, func(r *domain.InvoiceRequest) { r.Customer.ID = "C-1" })
	cases := []struct {
		name, field string
		err         error
	}{
		{"edit without reason", "reason", second(dl.Edit(p, "  ", "alice", false, nil))},
		{"edit without actor", "actor", second(dl.Edit(p, "fix", "", false, nil))},
		{"edit with invalid JSON", "payload", second(dl.Edit([]byte(`{"deal_id":`), "fix", "alice", false, nil))},
		{"reinject without reason", "reason", second(dl.Reinject("bob", "", dl.Key, false, "", 0))},
		{"reinject without actor", "actor", second(dl.Reinject(" ", "go", dl.Key, false, "", 0))},
		{"discard without reason", "reason", second(dl.Discard("bob", ""))},
		{"discard without actor", "actor", second(dl.Discard("", "give up"))},
	}
	for _, c := range cases {
		var ve *domain.ValidationError
		if !errors.As(c.err, &ve) || ve.Field != c.field {
			t.Errorf("%s: %v, want a validation error naming %q", c.name, c.err, c.field)
		}
	}
	// The validator's error comes back as it is.
	verr := &domain.ValidationError{Field: "total", Reason: "does not add up"}
	if _, err := dl.Edit(p, "fix", "alice", false, func([]byte) error { return verr }); err != verr {
		t.Errorf("validator error: %v, want it unchanged", err)
	}
	if dl.Version != 1 || len(dl.Revisions) != 1 || dl.State != domain.DLStateOpen {
		t.Errorf("refused actions changed the aggregate: %+v", dl)
	}
}

func second[T any](_ T, err error) error { return err }

// TestDeadLetterRevisionsPatchAgainstOriginal: every edit is a new revision
// whose patch leads from the ORIGINAL payload (revision 0) to it; the
// history survives re-injects and further edits.
func TestDeadLetterRevisionsPatchAgainstOriginal(t *testing.T) {
	t.Parallel()
	orig := payloadOf(t, nil)
	dl := newDL(t, orig)
	p1 := payloadOf(t, func(r *domain.InvoiceRequest) { r.Customer.ID = "C-1" })
	e1 := mustEdit(t, dl, p1, "alice", false)
	if e1.Revision != 1 || e1.Actor != "alice" || e1.Reason != "fix it" || e1.MoneyChanged || e1.NeedsApproval {
		t.Fatalf("edit 1 = %+v", e1)
	}
	wantOps(t, e1.Patch, "replace /customer/id")

	p2 := payloadOf(t, func(r *domain.InvoiceRequest) { r.Customer.ID = "C-1"; r.Customer.Name = "Globex Corp" })
	e2 := mustEdit(t, dl, p2, "alice", false)
	// Against the original: both changes, not just the name.
	wantOps(t, e2.Patch, "replace /customer/id", "replace /customer/name")

	mustReinject(t, dl, 0)
	dl.Apply(domain.DeadLetterReopened{DeadLetterID: dlID, Reason: "ERP down", ErrorClass: "exhausted", Attempts: 8})

	p3 := payloadOf(t, func(r *domain.InvoiceRequest) { r.Customer.ID = "C-2" })
	e3 := mustEdit(t, dl, p3, "carol", false)
	if e3.Revision != 3 {
		t.Fatalf("revision after a re-inject = %d, want 3", e3.Revision)
	}
	wantOps(t, e3.Patch, "replace /customer/id")

	// Same content, other spelling: a revision with an empty patch.
	respelled := []byte(strings.Replace(string(orig), `{"deal_id"`, "{ \n\t\"deal_id\"", 1))
	e4 := mustEdit(t, dl, respelled, "carol", false)
	if string(e4.Patch) != "[]" || e4.MoneyChanged {
		t.Fatalf("re-spelled original: patch %s, money %v; want [] and false", e4.Patch, e4.MoneyChanged)
	}

	if len(dl.Revisions) != 5 {
		t.Fatalf("%d revisions, want 5", len(dl.Revisions))
	}
	for i, r := range dl.Revisions {
		if r.Number != i {
			t.Errorf("revision %d numbered %d", i, r.Number)
		}
		if i == 0 {
			sameJSON(t, "revision 0", r.Payload, orig)
			continue
		}
		got, err := applyPatch(orig, r.Patch)
		if err != nil {
			t.Fatalf("revision %d: apply patch %s: %v", i, r.Patch, err)
		}
		sameJSON(t, "original + patch of revision "+strconv.Itoa(i), got, r.Payload)
	}
	sameJSON(t, "latest", dl.Latest().Payload, orig)
}

// An entry whose payload was not JSON at all (a poison message) can still
// be fixed by an edit.
func TestDeadLetterEditOfNonJSONPayload(t *testing.T) {
	t.Parallel()
	dl := newDL(t, []byte("deal_id=7d3c9a8e; not JSON"))
	if dl.Revisions[0].Payload == nil {
		t.Fatal("revision 0 lost the text payload")
	}
	fixed := payloadOf(t, nil)
	ch, err := dl.Edit(fixed, "rewrote the payload", "alice", true, nil)
	if err != nil {
		t.Fatalf("edit of a non-JSON payload: %v", err)
	}
	commit(t, dl, ch)
	ev := ch.Events[0].(domain.DeadLetterEdited)
	sameJSON(t, "revision 1", ev.Payload, fixed)
	if !json.Valid(ev.Patch) {
		t.Fatalf("patch %q is not JSON", ev.Patch)
	}
	if !ev.MoneyChanged || !ev.NeedsApproval {
		t.Errorf("replacing an unreadable payload must count as a money change: %+v", ev)
	}
}

func wantOps(t *testing.T, patch json.RawMessage, want ...string) {
	t.Helper()
	var ops []struct {
		Op   string `json:"op"`
		Path string `json:"path"`
	}
	if err := json.Unmarshal(patch, &ops); err != nil {
		t.Fatalf("patch %s: %v", patch, err)
	}
	var got []string
	for _, o := range ops {
		got = append(got, o.Op+" "+o.Path)
	}
	if strings.Join(got, ", ") != strings.Join(want, ", ") {
		t.Fatalf("patch %s: ops %q, want %q", patch, got, want)
	}
}

func sameJSON(t *testing.T, what string, a, b []byte) {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if !reflect.DeepEqual(x, y) {
		t.Fatalf("%s:\n got %s\nwant %s", what, a, b)
	}
}

// applyPatch applies an RFC 6902 patch of add, remove and replace
// operations (what jsondiff produces) to doc.
func applyPatch(doc, patch []byte) ([]byte, error) {
	var root any
	if err := json.Unmarshal(doc, &root); err != nil {
		return nil, err
	}
	var ops []struct {
		Op    string          `json:"op"`
		Path  string          `json:"path"`
		Value json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(patch, &ops); err != nil {
		return nil, err
	}
	for _, o := range ops {
		var val any
		if o.Op != "remove" {
			if err := json.Unmarshal(o.Value, &val); err != nil {
				return nil, fmt.Errorf("%s %s: %w", o.Op, o.Path, err)
			}
		}
		if o.Path == "" {
			if o.Op == "remove" {
				root = nil
			} else {
				root = val
			}
			continue
		}
		toks := strings.Split(o.Path, "/")[1:]
		for i := range toks {
			toks[i] = strings.ReplaceAll(strings.ReplaceAll(toks[i], "~1", "/"), "~0", "~")
		}
		var err error
		root, err = patchAt(root, toks, o.Op, val)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", o.Op, o.Path, err)
		}
	}
	return json.Marshal(root)
}

func patchAt(node any, toks []string, op string, val any) (any, error) {
	tok, last := toks[0], len(toks) == 1
	switch n := node.(type) {
	case map[string]any:
		if last {
			switch op {
			case "add", "replace":
				n[tok] = val
			case "remove":
				delete(n, tok)
			default:
				return nil, fmt.Errorf("unsupported op %q", op)
			}
			return n, nil
		}
		child, ok := n[tok]
		if !ok {
			return nil, fmt.Errorf("no member %q", tok)
		}
		c, err := patchAt(child, toks[1:], op, val)
		n[tok] = c
		return n, err
	case []any:
		i := len(n)
		if tok != "-" {
			var err error
			if i, err = strconv.Atoi(tok); err != nil || i < 0 || i > len(n) {
				return nil, fmt.Errorf("bad index %q", tok)
			}
		}
		if last {
			switch op {
			case "add":
				return append(n[:i], append([]any{val}, n[i:]...)...), nil
			case "replace":
				n[i] = val
			case "remove":
				return append(n[:i], n[i+1:]...), nil
			default:
				return nil, fmt.Errorf("unsupported op %q", op)
			}
			return n, nil
		}
		c, err := patchAt(n[i], toks[1:], op, val)
		n[i] = c
		return n, err
	}
	return nil, fmt.Errorf("cannot descend into %T", node)
}

// TestMoneyFieldDetection: currency, lines (any part of them) and total
// are money fields; the customer and the spelling of the JSON are not.
func TestMoneyFieldDetection(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		mutate func(*domain.InvoiceRequest)
		money  bool
	}{
		{"customer id", func(r *domain.InvoiceRequest) { r.Customer.ID = "C-1" }, false},
		{"customer name", func(r *domain.InvoiceRequest) { r.Customer.Name = "Initech" }, false},
		{"nothing", func(*domain.InvoiceRequest) {}, false},
		{"unit price", func(r *domain.InvoiceRequest) { r.Lines[0].UnitPrice = "400.00"; r.Total = "800.00" }, true},
		{"quantity", func(r *domain.InvoiceRequest) { r.Lines[0].Quantity = 1; r.Total = "495.00" }, true},
		{"currency", func(r *domain.InvoiceRequest) { r.Currency = "EUR" }, true},
		{"total only", func(r *domain.InvoiceRequest) { r.Total = "991.00" }, true},
		{"line added", func(r *domain.InvoiceRequest) {
			r.Lines = append(r.Lines, domain.Line{SKU: "SKU-2", Description: "Gadget", Quantity: 1, UnitPrice: "1.00"})
			r.Total = "991.00"
		}, true},
		{"line sku", func(r *domain.InvoiceRequest) { r.Lines[0].SKU = "SKU-2" }, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, mc := range []bool{false, true} {
				dl := newDL(t, payloadOf(t, nil))
				ev := mustEdit(t, dl, payloadOf(t, c.mutate), "alice", mc)
				if ev.MoneyChanged != c.money || ev.NeedsApproval != (c.money && mc) {
					t.Errorf("maker-checker %v: money_changed %v, needs_approval %v; want %v, %v",
						mc, ev.MoneyChanged, ev.NeedsApproval, c.money, c.money && mc)
				}
			}
		})
	}
}

// TestMakerChecker: a money edit needs another operator's approval before
// a re-inject; its author cannot approve it.
func TestMakerChecker(t *testing.T) {
	t.Parallel()
	cheaper := func(r *domain.InvoiceRequest) { r.Lines[0].UnitPrice = "400.00"; r.Total = "800.00" }
	t.Run("approve by another operator", func(t *testing.T) {
		dl := newDL(t, payloadOf(t, nil))
		mustEdit(t, dl, payloadOf(t, cheaper), "alice", true)
		if _, err := dl.Reinject("bob", "go", dl.Key, false, "", 0); !errors.Is(err, domain.ErrApprovalRequired) {
			t.Fatalf("re-inject before approval: %v, want ErrApprovalRequired", err)
		}
		if _, err := dl.Approve("alice"); !errors.Is(err, domain.ErrSelfApproval) {
			t.Fatalf("self-approval: %v, want ErrSelfApproval", err)
		}
		if _, err := dl.Approve(""); err == nil {
			t.Fatal("approval without an actor must be refused")
		}
		ch, err := dl.Approve("bob")
		if err != nil {
			t.Fatal(err)
		}
		commit(t, dl, ch)
		if ap := ch.Events[0].(domain.DeadLetterApproved); ap.Revision != 1 || ap.Actor != "bob" || dl.Latest().ApprovedBy != "bob" {
			t.Fatalf("approval %+v, latest %+v", ap, dl.Latest())
		}
		if _, err := dl.Approve("carol"); !isStateConflict(err) {
			t.Fatalf("second approval: %v, want a state conflict", err)
		}
		// The approver may re-inject (it is the maker who may not check).
		if ev := mustReinject(t, dl, 0); ev.Revision != 1 {
			t.Fatalf("re-injected revision %d, want 1", ev.Revision)
		}
	})
	t.Run("a later edit needs approval again", func(t *testing.T) {
		dl := newDL(t, payloadOf(t, nil))
		mustEdit(t, dl, payloadOf(t, cheaper), "alice", true)
		commit(t, dl, second2(t)(dl.Approve("bob")))
		// A further money edit: approval again.
		ev := mustEdit(t, dl, payloadOf(t, func(r *domain.InvoiceRequest) { r.Lines[0].UnitPrice = "300.00"; r.Total = "600.00" }), "alice", true)
		if !ev.NeedsApproval {
			t.Fatal("a second money edit needs approval again")
		}
		commit(t, dl, second2(t)(dl.Approve("bob")))
		// A non-money edit on top of approved money: nothing to approve.
		ev = mustEdit(t, dl, payloadOf(t, func(r *domain.InvoiceRequest) {
			r.Lines[0].UnitPrice = "300.00"
			r.Total = "600.00"
			r.Customer.ID = "C-1"
		}), "alice", true)
		if ev.NeedsApproval {
			t.Fatalf("customer edit on an approved revision: %+v, want no approval needed", ev)
		}
		mustReinject(t, dl, 0)
	})
	t.Run("a non-money edit does not launder a pending money edit", func(t *testing.T) {
		dl := newDL(t, payloadOf(t, nil))
		mustEdit(t, dl, payloadOf(t, cheaper), "alice", true)
		// Same prices, other customer: the price change is still unapproved.
		ev := mustEdit(t, dl, payloadOf(t, func(r *domain.InvoiceRequest) { cheaper(r); r.Customer.ID = "C-1" }), "alice", true)
		if !ev.NeedsApproval {
			t.Fatal("an unapproved money change must stay unapproved through a later non-money edit")
		}
		if _, err := dl.Reinject("alice", "go", dl.Key, false, "", 0); !errors.Is(err, domain.ErrApprovalRequired) {
			t.Fatalf("re-inject: %v, want ErrApprovalRequired", err)
		}
	})
	t.Run("reverting a pending money edit needs no approval", func(t *testing.T) {
		dl := newDL(t, payloadOf(t, nil))
		mustEdit(t, dl, payloadOf(t, cheaper), "alice", true)
		ev := mustEdit(t, dl, payloadOf(t, func(r *domain.InvoiceRequest) { r.Customer.ID = "C-1" }), "alice", true)
		if ev.NeedsApproval {
			t.Fatal("money back as originally approved: no approval needed")
		}
		mustReinject(t, dl, 0)
	})
	t.Run("no author of the pending change may approve it", func(t *testing.T) {
		dl := newDL(t, payloadOf(t, nil))
		mustEdit(t, dl, payloadOf(t, cheaper), "alice", true)
		mustEdit(t, dl, payloadOf(t, func(r *domain.InvoiceRequest) { cheaper(r); r.Customer.Name = "Globex Corp" }), "bob", true)
		if _, err := dl.Approve("alice"); !errors.Is(err, domain.ErrSelfApproval) {
			t.Fatalf("alice approving bob's revision that carries her own price change: %v, want ErrSelfApproval", err)
		}
		if _, err := dl.Approve("bob"); !errors.Is(err, domain.ErrSelfApproval) {
			t.Fatalf("bob approving his own revision: %v, want ErrSelfApproval", err)
		}
		commit(t, dl, second2(t)(dl.Approve("carol")))
		mustReinject(t, dl, 0)
	})
	t.Run("off", func(t *testing.T) {
		dl := newDL(t, payloadOf(t, nil))
		ev := mustEdit(t, dl, payloadOf(t, cheaper), "alice", false)
		if !ev.MoneyChanged || ev.NeedsApproval {
			t.Fatalf("maker-checker off: %+v", ev)
		}
		mustReinject(t, dl, 0)
	})
}

func second2(t *testing.T) func(domain.Change, error) domain.Change {
	return func(ch domain.Change, err error) domain.Change {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return ch
	}
}

// TestReinjectLoopGuard: an entry is re-injected at most maxReinjects
// times (0: no limit); each re-inject records its count, key and operation.
func TestReinjectLoopGuard(t *testing.T) {
	t.Parallel()
	dl := newDL(t, payloadOf(t, nil))
	const max = 3
	for i := 1; i <= max; i++ {
		ch, err := dl.Reinject("bob", "again", dl.Key, false, "op-1", max)
		if err != nil {
			t.Fatalf("re-inject %d: %v", i, err)
		}
		commit(t, dl, ch)
		ev := ch.Events[0].(domain.DeadLetterReinjected)
		if ev.Count != i || ev.OperationID != "op-1" || ev.IdempotencyKey != dealID+":2" || ev.NewKey || ev.Revision != 0 {
			t.Fatalf("re-inject %d: %+v", i, ev)
		}
		if dl.Reinjects != i || dl.State != domain.DLStateReinjected {
			t.Fatalf("after re-inject %d: reinjects %d, state %s", i, dl.Reinjects, dl.State)
		}
		dl.Apply(domain.DeadLetterReopened{DeadLetterID: dlID, Reason: "failed again", ErrorClass: "permanent", Attempts: 1})
	}
	v := dl.Version
	if _, err := dl.Reinject("bob", "once more", dl.Key, false, "", max); !errors.Is(err, domain.ErrReinjectLimit) {
		t.Fatalf("re-inject %d: %v, want ErrReinjectLimit", max+1, err)
	}
	if dl.Version != v {
		t.Fatal("a refused re-inject changed the aggregate")
	}
	// No limit; and a new key is recorded and becomes the entry's key.
	newKey := dealID + ":2:r4"
	ch, err := dl.Reinject("bob", "new key", newKey, true, "", 0)
	if err != nil {
		t.Fatalf("re-inject without a limit: %v", err)
	}
	commit(t, dl, ch)
	if ev := ch.Events[0].(domain.DeadLetterReinjected); !ev.NewKey || ev.IdempotencyKey != newKey || ev.Count != max+1 || dl.Key != newKey {
		t.Fatalf("new-key re-inject %+v, entry key %s", ev, dl.Key)
	}
}

// reverted returns the example deal won and then reverted.
func reverted(t *testing.T) *domain.Deal {
	t.Helper()
	d := newExampleDeal(t)
	ch, err := d.Close(domain.OutcomeWon, nil, map[string]domain.Stock{"SKU-1": {SKU: "SKU-1", Available: 5, Version: 1}})
	if err != nil {
		t.Fatal(err)
	}
	d.Apply(ch[0].Events...)
	rv, err := d.Revert(d.InvoiceKey(), "ERP rejected", map[string]domain.Stock{"SKU-1": {SKU: "SKU-1", Available: 3, Version: 2}})
	if err != nil {
		t.Fatal(err)
	}
	d.Apply(rv[0].Events...)
	return d
}

func TestDealReinstate(t *testing.T) {
	t.Parallel()
	d := reverted(t)
	key := d.InvoiceKey()
	if _, err := d.Reinstate(key, "fixed", map[string]domain.Stock{"SKU-1": {SKU: "SKU-1", Available: 1, Version: 3}}); err == nil {
		t.Fatal("reinstating without the stock must be refused")
	} else if se := (*domain.InsufficientStockError)(nil); !errors.As(err, &se) || se.Requested != 2 || se.Available != 1 {
		t.Fatalf("insufficient stock: %v", err)
	}
	changes, err := d.Reinstate(key, "fixed", map[string]domain.Stock{"SKU-1": {SKU: "SKU-1", Available: 5, Version: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if len(changes) != 2 || changes[0].StreamID != domain.DealStream(dealID) || changes[0].ExpectedVersion != d.Version() {
		t.Fatalf("changes = %+v", changes)
	}
	ri := changes[0].Events[0].(domain.DealReinstated)
	if ri.IdempotencyKey != key || ri.PreviousKey != key || ri.Reason != "fixed" {
		t.Fatalf("reinstated = %+v", ri)
	}
	if al := changes[1].Events[0].(domain.InventoryAllocated); changes[1].ExpectedVersion != 3 || al.Quantity != 2 || al.SKU != "SKU-1" {
		t.Fatalf("allocation = %+v", changes[1])
	}
	d.Apply(changes[0].Events...)
	if d.Status() != domain.StatusWon || d.InvoiceKey() != key {
		t.Fatalf("after reinstate: %s %s", d.Status(), d.InvoiceKey())
	}
	if _, err := d.Reinstate(key, "twice", nil); !errors.As(err, new(*domain.TransitionError)) {
		t.Fatalf("reinstating a won deal: %v, want a TransitionError", err)
	}
	inv, err := d.RecordInvoice(key, "INV-1", 1)
	if err != nil || inv == nil {
		t.Fatalf("invoice after reinstate: %v", err)
	}

	// With a new key: the deal's close moves to it.
	d2 := reverted(t)
	nk := d2.InvoiceKey() + ":r1"
	ch, err := d2.Reinstate(nk, "new key", map[string]domain.Stock{"SKU-1": {SKU: "SKU-1", Available: 5, Version: 3}})
	if err != nil {
		t.Fatal(err)
	}
	d2.Apply(ch[0].Events...)
	if d2.InvoiceKey() != nk || ch[0].Events[0].(domain.DealReinstated).PreviousKey != key {
		t.Fatalf("new key: deal key %s, event %+v", d2.InvoiceKey(), ch[0].Events[0])
	}
	if _, err := newExampleDeal(t).Reinstate("k", "r", nil); !errors.As(err, new(*domain.TransitionError)) {
		t.Fatalf("reinstating an open deal: %v", err)
	}
}

func TestValidateInvoiceRequest(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		mutate func(*domain.InvoiceRequest)
		field  string
	}{
		{"valid", func(*domain.InvoiceRequest) {}, ""},
		{"re-inject key", func(r *domain.InvoiceRequest) { r.IdempotencyKey += ":r2" }, ""},
		{"no deal", func(r *domain.InvoiceRequest) { r.DealID = "" }, "deal_id"},
		{"foreign key", func(r *domain.InvoiceRequest) { r.IdempotencyKey = dealID + ":3" }, "idempotency_key"},
		{"key of another deal", func(r *domain.InvoiceRequest) { r.IdempotencyKey = "x:2" }, "idempotency_key"},
		{"close version", func(r *domain.InvoiceRequest) { r.CloseVersion = 3 }, "idempotency_key"},
		{"customer id", func(r *domain.InvoiceRequest) { r.Customer.ID = "C 9!" }, "customer.id"},
		{"customer name", func(r *domain.InvoiceRequest) { r.Customer.Name = " " }, "customer.name"},
		{"currency", func(r *domain.InvoiceRequest) { r.Currency = "XXX" }, "currency"},
		{"no lines", func(r *domain.InvoiceRequest) { r.Lines = nil }, "lines"},
		{"unit price", func(r *domain.InvoiceRequest) { r.Lines[0].UnitPrice = "4.955" }, "lines[0].unit_price"},
		{"quantity", func(r *domain.InvoiceRequest) { r.Lines[0].Quantity = 0 }, "lines[0].quantity"},
		{"total", func(r *domain.InvoiceRequest) { r.Total = "989.00" }, "total"},
		{"total spelling", func(r *domain.InvoiceRequest) { r.Total = "990" }, "total"},
	}
	for _, c := range cases {
		r := invoiceReq()
		c.mutate(&r)
		err := domain.ValidateInvoiceRequest(r)
		if c.field == "" {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		var ve *domain.ValidationError
		if !errors.As(err, &ve) || ve.Field != c.field {
			t.Errorf("%s: %v, want a validation error naming %q", c.name, err, c.field)
		}
	}
}
