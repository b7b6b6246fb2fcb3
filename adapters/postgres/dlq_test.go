package postgres_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shopspring/decimal"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// Dead-letter operations against a real Postgres: the state guard under
// concurrency, re-inject end to end in the store, maker-checker, revision
// history, the audit log (same transaction, append-only), bulk re-inject
// with a crash and a resume, and keyset listing at 100,000 rows.

var (
	alice = postgres.Actor{Name: "alice", Role: "operator", RequestID: "req-alice"}
	bob   = postgres.Actor{Name: "bob", Role: "operator", RequestID: "req-bob"}
	carol = postgres.Actor{Name: "carol", Role: "admin"}
)

const dlSKU = "SKU-DL"

type dlqFixture struct {
	t     *testing.T
	pool  *pgxpool.Pool
	store *postgres.Store
}

func newDLQFixture(t *testing.T, maxConns int32) *dlqFixture {
	t.Helper()
	pool := newPool(t, maxConns)
	f := &dlqFixture{t: t, pool: pool, store: postgres.NewStore(pool)}
	setStock(t, f.store, dlSKU, 100_000)
	return f
}

// failed is a deal whose invoice the ERP rejected: compensated by the
// store exactly as the saga does it, with its dead letter and alert.
type failed struct {
	deal    postgres.DealView
	req     domain.InvoiceRequest
	dlID    string
	alertID string
}

func invoiceRequestOf(d postgres.DealView) domain.InvoiceRequest {
	return domain.InvoiceRequest{DealID: d.ID, IdempotencyKey: *d.IdempotencyKey, CloseVersion: *d.CloseVersion,
		Customer: d.Customer, Currency: d.Currency, Lines: d.Lines, Total: d.Total}
}

func (f *dlqFixture) failedDeal(customerID string) failed {
	f.t.Helper()
	fd, err := f.tryFailedDeal(f.t.Context(), customerID, 1)
	if err != nil {
		f.t.Fatal(err)
	}
	return fd
}

func (f *dlqFixture) tryFailedDeal(ctx context.Context, customerID string, qty int64) (failed, error) {
	d, err := f.store.CreateDeal(ctx, domain.Customer{ID: customerID, Name: "Customer " + customerID}, "USD",
		[]domain.Line{{SKU: dlSKU, Description: "Widget", Quantity: qty, UnitPrice: "495.00"}}, meta)
	if err != nil {
		return failed{}, err
	}
	if d, err = f.store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); err != nil {
		return failed{}, err
	}
	req := invoiceRequestOf(d)
	res, err := f.compensate(ctx, req, "permanent", "unknown customer "+customerID)
	if err != nil {
		return failed{}, err
	}
	if res.Outcome != postgres.Compensated {
		return failed{}, fmt.Errorf("compensate deal %s: outcome %v", d.ID, res.Outcome)
	}
	return failed{deal: d, req: req, dlID: res.DeadLetterID, alertID: res.AlertID}, nil
}

// compensate ends the saga of req as the handler does after a 422.
func (f *dlqFixture) compensate(ctx context.Context, req domain.InvoiceRequest, class, reason string) (postgres.CompensationResult, error) {
	payload, err := json.Marshal(req)
	if err != nil {
		return postgres.CompensationResult{}, err
	}
	now := time.Now()
	return f.store.Compensate(ctx, req,
		postgres.Failure{ErrorClass: class, Reason: reason, Attempts: 1, FirstFailureAt: now, LastFailureAt: now},
		postgres.DeadLetterSource{MessageUUID: watermill.NewUUID(), Topic: outbox.InvoiceTopic, Handler: "invoice-saga", Payload: payload,
			Metadata: map[string]string{outbox.MetadataType: outbox.TypeInvoiceRequest, outbox.MetadataSchemaVersion: "1",
				outbox.MetadataIdempotencyKey: req.IdempotencyKey}},
		meta)
}

func payloadJSON(t *testing.T, req domain.InvoiceRequest, mutate func(*domain.InvoiceRequest)) []byte {
	t.Helper()
	req.Lines = slices.Clone(req.Lines)
	if mutate != nil {
		mutate(&req)
	}
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func toC1(r *domain.InvoiceRequest) { r.Customer.ID = "C-1" }

func cheaper(r *domain.InvoiceRequest) {
	r.Lines[0].UnitPrice = "400.00"
	r.Total = domain.FormatAmount(decimal.RequireFromString("400.00").Mul(decimal.NewFromInt(r.Lines[0].Quantity)), r.Currency)
}

func (f *dlqFixture) deadLetter(id string) postgres.DeadLetterDetail {
	f.t.Helper()
	d, err := f.store.GetDeadLetter(f.t.Context(), id)
	if err != nil {
		f.t.Fatal(err)
	}
	return d
}

func (f *dlqFixture) deal(id string) postgres.DealView {
	f.t.Helper()
	d, err := f.store.GetDeal(f.t.Context(), id)
	if err != nil {
		f.t.Fatal(err)
	}
	return d
}

// audit returns the audit rows of one target, oldest first.
func (f *dlqFixture) audit(targetID string) []postgres.AuditEntry {
	f.t.Helper()
	rows, err := f.store.ListAudit(f.t.Context(), postgres.AuditFilter{TargetID: targetID, Limit: 10000})
	if err != nil {
		f.t.Fatal(err)
	}
	slices.Reverse(rows)
	return rows
}

func actions(rows []postgres.AuditEntry) []string {
	out := make([]string, len(rows))
	for i, r := range rows {
		out[i] = r.Action
	}
	return out
}

func isStateConflict(err error) bool {
	var se *domain.StateError
	return errors.As(err, &se) && errors.Is(err, domain.ErrStateConflict)
}

func fieldOf(err error) string {
	var ve *domain.ValidationError
	if errors.As(err, &ve) {
		return ve.Field
	}
	return ""
}

// reinjectedMessages returns the outbox messages re-injected from dead
// letters, in outbox order.
func reinjectedMessages(t *testing.T, ctx context.Context, q postgres.Querier) []envelope {
	t.Helper()
	var out []envelope
	for _, m := range outboxMessages(t, ctx, q) {
		if m.Metadata[outbox.MetadataReinjectedFrom] != "" {
			out = append(out, m)
		}
	}
	return out
}

// TestReinjectRaceOneWinner: concurrent re-injects of one entry (and a
// re-inject racing a discard) end with exactly one winner; every loser gets
// domain.ErrStateConflict and leaves no trace: no event, no audit row, no
// outbox message.
func TestReinjectRaceOneWinner(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const entries, racers = 6, 4
	f := newDLQFixture(t, racers*entries+4)
	fds := make([]failed, entries)
	for i := range fds {
		fds[i] = f.failedDeal("C-9")
	}
	inv0, err := f.store.GetInventory(ctx, dlSKU)
	if err != nil {
		t.Fatal(err)
	}

	start := make(chan struct{})
	errs := make([][]error, entries)
	var wg sync.WaitGroup
	for i, fd := range fds {
		errs[i] = make([]error, racers)
		for r := range racers {
			wg.Go(func() {
				<-start
				a := postgres.Actor{Name: fmt.Sprintf("op-%d", r), Role: "operator"}
				// The last entry races a discard against the re-injects.
				if i == entries-1 && r == 0 {
					errs[i][r] = f.store.DiscardDeadLetter(ctx, fd.dlID, "duplicate", a)
					return
				}
				_, errs[i][r] = f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "customer fixed"}, a)
			})
		}
	}
	close(start)
	wg.Wait()

	reinjected := 0
	for i, fd := range fds {
		winners := 0
		for r, err := range errs[i] {
			switch {
			case err == nil:
				winners++
			case isStateConflict(err):
				if !strings.Contains(err.Error(), fd.dlID) {
					t.Errorf("entry %d racer %d: %q does not name the entry", i, r, err)
				}
			default:
				t.Errorf("entry %d racer %d: %v, want nil or a state conflict", i, r, err)
			}
		}
		if winners != 1 {
			t.Fatalf("entry %d: %d winners, want exactly 1 (%v)", i, winners, errs[i])
		}
		dl := f.deadLetter(fd.dlID)
		reinjects := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE stream_id=$1 AND type=$2`,
			domain.DeadLetterStream(fd.dlID), domain.TypeDeadLetterReinjected)
		discards := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE stream_id=$1 AND type=$2`,
			domain.DeadLetterStream(fd.dlID), domain.TypeDeadLetterDiscarded)
		if reinjects+discards != 1 {
			t.Errorf("entry %d: %d re-inject and %d discard events, want one in all", i, reinjects, discards)
		}
		if got := actions(f.audit(fd.dlID)); len(got) != 1 {
			t.Errorf("entry %d: audit rows %v, want exactly the winner's", i, got)
		}
		d := f.deal(fd.deal.ID)
		switch dl.State {
		case domain.DLStateReinjected:
			reinjected++
			if dl.Reinjects != 1 || d.Status != domain.StatusWon {
				t.Errorf("entry %d: reinjects %d, deal %s; want 1 and won", i, dl.Reinjects, d.Status)
			}
			if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE stream_id=$1 AND type=$2`,
				domain.DealStream(fd.deal.ID), domain.TypeDealReinstated); n != 1 {
				t.Errorf("entry %d: %d DealReinstated, want 1", i, n)
			}
		case domain.DLStateDiscarded:
			if d.Status != domain.StatusReverted {
				t.Errorf("entry %d: discarded, but the deal is %s", i, d.Status)
			}
		default:
			t.Errorf("entry %d: state %s", i, dl.State)
		}
	}
	msgs := reinjectedMessages(t, ctx, f.pool)
	if len(msgs) != reinjected {
		t.Fatalf("%d re-injected outbox messages, want %d (one per winner)", len(msgs), reinjected)
	}
	inv, err := f.store.GetInventory(ctx, dlSKU)
	if err != nil {
		t.Fatal(err)
	}
	if inv.Allocated != inv0.Allocated+int64(reinjected) {
		t.Errorf("allocated %d, want %d + %d re-instated deals", inv.Allocated, inv0.Allocated, reinjected)
	}
}

// TestReinjectEndToEndInStore: a re-inject is one transaction (entry,
// deal, inventory, saga, outbox, audit); the invoice then resolves the
// entry and its alert; a resolved entry cannot be re-injected again.
func TestReinjectEndToEndInStore(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 6)
	fd := f.failedDeal("C-9")
	if d := f.deal(fd.deal.ID); d.Status != domain.StatusReverted {
		t.Fatalf("deal after compensation: %s", d.Status)
	}
	inv0, _ := f.store.GetInventory(ctx, dlSKU)

	if _, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, toC1), "customer C-9 is C-1 in the ERP", alice); err != nil {
		t.Fatal(err)
	}
	pos := lastPosition(t, ctx, f.pool)
	res, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "customer fixed"}, bob)
	if err != nil {
		t.Fatal(err)
	}
	if res.DealID != fd.deal.ID || res.IdempotencyKey != fd.req.IdempotencyKey || res.NewKey || res.Revision != 1 || res.Count != 1 {
		t.Fatalf("result %+v", res)
	}
	want := []string{
		domain.DeadLetterStream(fd.dlID) + " " + domain.TypeDeadLetterReinjected,
		domain.DealStream(fd.deal.ID) + " " + domain.TypeDealReinstated,
		domain.InventoryStream(dlSKU) + " " + domain.TypeInventoryAllocated,
		domain.SagaStream(fd.req.IdempotencyKey) + " " + domain.TypeInvoiceSagaResumed,
	}
	if got := eventTypesAfter(t, ctx, f.pool, pos); !slices.Equal(got, want) {
		t.Fatalf("events of the re-inject:\n got %v\nwant %v", got, want)
	}
	if d := f.deal(fd.deal.ID); d.Status != domain.StatusWon || *d.IdempotencyKey != fd.req.IdempotencyKey {
		t.Fatalf("deal after re-inject: %s %v", d.Status, *d.IdempotencyKey)
	}
	if inv, _ := f.store.GetInventory(ctx, dlSKU); inv.Allocated != inv0.Allocated+1 || inv.Available != inv0.Available-1 {
		t.Fatalf("inventory %+v, want one more allocated than %+v", inv, inv0)
	}
	if s, _, _ := f.store.Saga(ctx, fd.req.IdempotencyKey); s.State != domain.SagaPending || s.Attempts != 0 {
		t.Fatalf("saga after re-inject: %+v", s)
	}
	msgs := reinjectedMessages(t, ctx, f.pool)
	if len(msgs) != 1 {
		t.Fatalf("%d re-injected messages, want 1", len(msgs))
	}
	m := msgs[0]
	if m.UUID != res.MessageUUID || m.DestinationTopic != outbox.InvoiceTopic || m.Metadata[outbox.MetadataReinjectedFrom] != fd.dlID ||
		m.Metadata[outbox.MetadataIdempotencyKey] != fd.req.IdempotencyKey || m.Metadata[outbox.MetadataType] != outbox.TypeInvoiceRequest ||
		m.Metadata[outbox.MetadataCorrelationID] != bob.RequestID {
		t.Fatalf("re-injected message %+v", m)
	}
	var sent domain.InvoiceRequest
	if err := json.Unmarshal(m.Payload, &sent); err != nil {
		t.Fatal(err)
	}
	if sent.Customer.ID != "C-1" || sent.IdempotencyKey != fd.req.IdempotencyKey || sent.Total != fd.req.Total {
		t.Fatalf("re-injected payload %+v: want the edited revision with the same key", sent)
	}

	// The saga succeeds: the entry and its alert are resolved in the
	// transaction that records the invoice.
	if ok, err := f.store.RecordInvoice(ctx, fd.deal.ID, fd.req.IdempotencyKey, "INV-000001", meta); err != nil || !ok {
		t.Fatalf("record invoice: %v %v", ok, err)
	}
	dl := f.deadLetter(fd.dlID)
	if dl.State != domain.DLStateResolved {
		t.Fatalf("entry after the invoice: %s, want resolved", dl.State)
	}
	alerts, err := f.store.ListAlerts(ctx, "", 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range alerts {
		if a.ID == fd.alertID && a.State != "resolved" {
			t.Fatalf("alert after the invoice: %s, want resolved", a.State)
		}
	}
	types := func(evs []postgres.EventView) []string {
		var out []string
		for _, e := range evs {
			out = append(out, e.Type)
		}
		return out
	}
	if got, want := types(dl.History), []string{domain.TypeMessageDeadLettered, domain.TypeDeadLetterEdited,
		domain.TypeDeadLetterReinjected, domain.TypeDeadLetterResolved}; !slices.Equal(got, want) {
		t.Fatalf("entry history %v, want %v", got, want)
	}
	if got, want := types(f.deal(fd.deal.ID).Events), []string{domain.TypeDealCreated, domain.TypeDealWon, domain.TypeDealReverted,
		domain.TypeDealReinstated, domain.TypeInvoiceCreated}; !slices.Equal(got, want) {
		t.Fatalf("deal history %v, want %v", got, want)
	}

	// Nothing more to do with a resolved entry.
	before := dlqDump(t, ctx, f.pool)
	if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "again"}, bob); !isStateConflict(err) {
		t.Fatalf("re-inject of a resolved entry: %v, want a state conflict", err)
	}
	if err := f.store.DiscardDeadLetter(ctx, fd.dlID, "late", bob); !isStateConflict(err) {
		t.Fatalf("discard of a resolved entry: %v, want a state conflict", err)
	}
	if _, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, nil), "late", bob); !isStateConflict(err) {
		t.Fatalf("edit of a resolved entry: %v, want a state conflict", err)
	}
	dlqAssertUnchanged(t, before, dlqDump(t, ctx, f.pool))
}

// TestReinjectFailsAgainThenLoopGuard: a re-injected entry that fails again
// is reopened (the same entry, its history kept), can be re-injected again
// up to the loop guard; a re-inject under a new key is recorded and later
// re-injects keep to it.
func TestReinjectFailsAgainThenLoopGuard(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 6)
	fd := f.failedDeal("C-9")
	opt := postgres.ReinjectOptions{Reason: "try again", MaxReinjects: 3}
	for i := 1; i <= 3; i++ {
		res, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, opt, bob)
		if err != nil {
			t.Fatalf("re-inject %d: %v", i, err)
		}
		if res.Count != i {
			t.Fatalf("re-inject %d: count %d", i, res.Count)
		}
		cr, err := f.compensate(ctx, fd.req, "permanent", fmt.Sprintf("unknown customer C-9 (try %d)", i))
		if err != nil {
			t.Fatal(err)
		}
		if cr.Outcome != postgres.Compensated || cr.DeadLetterID != fd.dlID {
			t.Fatalf("failure after re-inject %d: %+v, want the same entry reopened", i, cr)
		}
		dl := f.deadLetter(fd.dlID)
		if dl.State != domain.DLStateOpen || dl.Reinjects != i || dl.Attempts != i+1 || !strings.Contains(dl.Reason, fmt.Sprintf("try %d", i)) {
			t.Fatalf("after failure %d: state %s, reinjects %d, attempts %d, reason %q", i, dl.State, dl.Reinjects, dl.Attempts, dl.Reason)
		}
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM dead_letters`); n != 1 {
		t.Fatalf("%d dead letters, want the one entry reopened each time", n)
	}
	before := dlqDump(t, ctx, f.pool)
	if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, opt, bob); !errors.Is(err, domain.ErrReinjectLimit) {
		t.Fatalf("fourth re-inject: %v, want ErrReinjectLimit", err)
	}
	dlqAssertUnchanged(t, before, dlqDump(t, ctx, f.pool))

	// A new key, explicitly asked for: recorded in the entry, the deal, the
	// saga, the message and the audit row.
	res, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "ERP lost the key", NewKey: true}, bob)
	if err != nil {
		t.Fatal(err)
	}
	nk := fd.req.IdempotencyKey + ":r4"
	if !res.NewKey || res.IdempotencyKey != nk {
		t.Fatalf("new-key re-inject %+v, want key %s", res, nk)
	}
	if d := f.deal(fd.deal.ID); d.Status != domain.StatusWon || *d.IdempotencyKey != nk {
		t.Fatalf("deal after new-key re-inject: %s %s", d.Status, *d.IdempotencyKey)
	}
	if s, ok, _ := f.store.Saga(ctx, nk); !ok || s.State != domain.SagaPending {
		t.Fatalf("saga of the new key: %+v %v", s, ok)
	}
	msgs := reinjectedMessages(t, ctx, f.pool)
	if last := msgs[len(msgs)-1]; last.Metadata[outbox.MetadataIdempotencyKey] != nk || !strings.Contains(string(last.Payload), nk) {
		t.Fatalf("new-key message %+v", last)
	}
	rows := f.audit(fd.dlID)
	if r := rows[len(rows)-1]; r.Action != "dead_letter.reinject" || !strings.Contains(r.Reason, nk) {
		t.Fatalf("audit row of the new-key re-inject: %+v", r)
	}

	// It fails again under the new key: the same entry reopens; by default
	// the next re-inject keeps the entry's key (the new one), and an edit of
	// the payload as shown is accepted.
	newReq := fd.req
	newReq.IdempotencyKey = nk
	if cr, err := f.compensate(ctx, newReq, "permanent", "still unknown"); err != nil || cr.DeadLetterID != fd.dlID {
		t.Fatalf("failure under the new key: %+v %v", cr, err)
	}
	shown := f.deadLetter(fd.dlID)
	if shown.State != domain.DLStateOpen || *shown.IdempotencyKey != nk {
		t.Fatalf("entry after the new key failed: %s %v", shown.State, *shown.IdempotencyKey)
	}
	var edited domain.InvoiceRequest
	if err := json.Unmarshal(shown.Payload, &edited); err != nil {
		t.Fatal(err)
	}
	toC1(&edited)
	if _, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, edited, nil), "the shown payload, customer fixed", alice); err != nil {
		t.Fatalf("edit of the shown payload after a new-key re-inject: %v", err)
	}
	res, err = f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "customer fixed", MaxReinjects: 10}, bob)
	if err != nil {
		t.Fatalf("default re-inject after a new-key re-inject: %v", err)
	}
	if res.IdempotencyKey != nk || res.NewKey {
		t.Fatalf("default re-inject after a new-key re-inject: %+v, want the entry's key %s", res, nk)
	}
	if ok, err := f.store.RecordInvoice(ctx, fd.deal.ID, nk, "INV-7", meta); err != nil || !ok {
		t.Fatalf("record invoice: %v %v", ok, err)
	}
	if dl := f.deadLetter(fd.dlID); dl.State != domain.DLStateResolved || len(dl.Revisions) != 2 {
		t.Fatalf("entry after success: %s with %d revisions", dl.State, len(dl.Revisions))
	}
}

// TestMakerCheckerInStore: with maker_checker on, a money edit blocks the
// re-inject until a different operator approves it; a non-money edit
// needs nothing. Refusals write nothing.
func TestMakerCheckerInStore(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 6)
	if on, err := f.store.MakerChecker(ctx); err != nil || on {
		t.Fatalf("maker-checker default: %v %v, want off", on, err)
	}
	if err := f.store.SetMakerChecker(ctx, true); err != nil {
		t.Fatal(err)
	}
	if on, _ := f.store.MakerChecker(ctx); !on {
		t.Fatal("maker-checker not on after SetMakerChecker(true)")
	}

	t.Run("money edit", func(t *testing.T) {
		fd := f.failedDeal("C-9")
		rev, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { toC1(r); cheaper(r) }),
			"agreed discount", alice)
		if err != nil {
			t.Fatal(err)
		}
		if !rev.MoneyChanged || !rev.NeedsApproval || rev.Number != 1 {
			t.Fatalf("revision %+v: want a money change awaiting approval", rev)
		}
		if v := f.deadLetter(fd.dlID); !v.NeedsApproval || v.ApprovedBy != nil || v.Revision != 1 {
			t.Fatalf("view: needs approval %v, approved by %v, revision %d", v.NeedsApproval, v.ApprovedBy, v.Revision)
		}
		before := dlqDump(t, ctx, f.pool)
		if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "go"}, bob); !errors.Is(err, domain.ErrApprovalRequired) {
			t.Fatalf("re-inject before approval: %v, want ErrApprovalRequired", err)
		}
		if err := f.store.ApproveDeadLetter(ctx, fd.dlID, alice); !errors.Is(err, domain.ErrSelfApproval) {
			t.Fatalf("self-approval: %v, want ErrSelfApproval", err)
		}
		dlqAssertUnchanged(t, before, dlqDump(t, ctx, f.pool))
		if err := f.store.ApproveDeadLetter(ctx, fd.dlID, bob); err != nil {
			t.Fatal(err)
		}
		if v := f.deadLetter(fd.dlID); v.ApprovedBy == nil || *v.ApprovedBy != "bob" || v.Revisions[1].ApprovedBy != "bob" {
			t.Fatalf("after approval: %v / %+v", v.ApprovedBy, v.Revisions[1])
		}
		if err := f.store.ApproveDeadLetter(ctx, fd.dlID, carol); !isStateConflict(err) {
			t.Fatalf("second approval: %v, want a state conflict", err)
		}
		res, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "approved discount"}, alice)
		if err != nil {
			t.Fatal(err)
		}
		if res.Revision != 1 {
			t.Fatalf("re-injected revision %d, want 1", res.Revision)
		}
		if got, want := actions(f.audit(fd.dlID)), []string{"dead_letter.edit", "dead_letter.approve", "dead_letter.reinject"}; !slices.Equal(got, want) {
			t.Fatalf("audit %v, want %v", got, want)
		}
	})
	t.Run("customer edit", func(t *testing.T) {
		fd := f.failedDeal("C-9")
		rev, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, toC1), "customer id", alice)
		if err != nil {
			t.Fatal(err)
		}
		if rev.MoneyChanged || rev.NeedsApproval {
			t.Fatalf("customer edit %+v: no approval needed", rev)
		}
		if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "go"}, alice); err != nil {
			t.Fatalf("re-inject after a non-money edit: %v", err)
		}
	})
	t.Run("money edit laundered by a customer edit", func(t *testing.T) {
		fd := f.failedDeal("C-9")
		if _, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, cheaper), "discount", alice); err != nil {
			t.Fatal(err)
		}
		rev, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { cheaper(r); toC1(r) }),
			"and the customer", bob)
		if err != nil {
			t.Fatal(err)
		}
		if !rev.NeedsApproval {
			t.Fatal("the unapproved discount must still need approval")
		}
		for _, a := range []postgres.Actor{alice, bob} {
			if err := f.store.ApproveDeadLetter(ctx, fd.dlID, a); !errors.Is(err, domain.ErrSelfApproval) {
				t.Errorf("approval by %s, an author of the pending change: %v, want ErrSelfApproval", a.Name, err)
			}
		}
		if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "go"}, carol); !errors.Is(err, domain.ErrApprovalRequired) {
			t.Fatalf("re-inject: %v, want ErrApprovalRequired", err)
		}
	})
}

// TestEditValidationNamesTheField: an invalid payload is refused with a
// validation error naming the field, and nothing is written.
func TestEditValidationNamesTheField(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 4)
	fd := f.failedDeal("C-9")
	good := string(payloadJSON(t, fd.req, toC1))
	cases := []struct {
		name, payload, field string
	}{
		{"total does not add up", string(payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { r.Total = "1.00" })), "total"},
		{"bad customer id", string(payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { r.Customer.ID = "no spaces allowed" })), "customer.id"},
		{"bad unit price", string(payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { r.Lines[0].UnitPrice = "4.955" })), "lines[0].unit_price"},
		{"bad currency", string(payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { r.Currency = "XXX" })), "currency"},
		{"other deal", string(payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) {
			r.DealID = "5d0c9a8e-8f1e-4a55-9b41-3b1f0f1c2d3e"
			r.IdempotencyKey = r.DealID + ":2"
		})), "deal_id"},
		{"other key", string(payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { r.IdempotencyKey += ":r1" })), "idempotency_key"},
		{"unknown field", strings.Replace(good, `{"deal_id"`, `{"discount":"5%","deal_id"`, 1), "discount"},
		{"wrong type", strings.Replace(good, `"quantity":1`, `"quantity":"1"`, 1), "lines.quantity"},
		{"amount as number", strings.Replace(good, `"total":"495.00"`, `"total":495`, 1), "total"},
		{"not JSON", `{"deal_id":`, "payload"},
		{"two objects", good + good, "payload"},
	}
	before := dlqDump(t, ctx, f.pool)
	for _, c := range cases {
		_, err := f.store.EditDeadLetter(ctx, fd.dlID, []byte(c.payload), "fix", alice)
		if got := fieldOf(err); got != c.field {
			t.Errorf("%s: %v (field %q), want a validation error naming %q", c.name, err, got, c.field)
		}
	}
	for _, c := range []struct {
		name, reason string
		actor        postgres.Actor
		field        string
	}{{"no reason", " ", alice, "reason"}, {"no actor", "fix", postgres.Actor{Role: "operator"}, "actor"}} {
		if _, err := f.store.EditDeadLetter(ctx, fd.dlID, []byte(good), c.reason, c.actor); fieldOf(err) != c.field {
			t.Errorf("%s: %v, want a validation error naming %q", c.name, err, c.field)
		}
	}
	for _, id := range []string{watermill.NewUUID(), "not-a-uuid", ""} {
		if _, err := f.store.EditDeadLetter(ctx, id, []byte(good), "fix", alice); !errors.Is(err, domain.ErrNotFound) {
			t.Errorf("edit of unknown entry %q: %v, want ErrNotFound", id, err)
		}
		if _, err := f.store.ReinjectDeadLetter(ctx, id, postgres.ReinjectOptions{Reason: "x"}, alice); !errors.Is(err, domain.ErrNotFound) {
			t.Errorf("re-inject of unknown entry %q: %v, want ErrNotFound", id, err)
		}
		if err := f.store.DiscardDeadLetter(ctx, id, "x", alice); !errors.Is(err, domain.ErrNotFound) {
			t.Errorf("discard of unknown entry %q: %v, want ErrNotFound", id, err)
		}
		if err := f.store.ApproveDeadLetter(ctx, id, alice); !errors.Is(err, domain.ErrNotFound) {
			t.Errorf("approve of unknown entry %q: %v, want ErrNotFound", id, err)
		}
		if _, err := f.store.GetDeadLetter(ctx, id); !errors.Is(err, domain.ErrNotFound) {
			t.Errorf("get of unknown entry %q: %v, want ErrNotFound", id, err)
		}
	}
	dlqAssertUnchanged(t, before, dlqDump(t, ctx, f.pool))
}

// TestRevisionHistorySurvives: edits, re-injects, a new failure and more
// edits: every revision is kept with its patch against the original.
func TestRevisionHistorySurvives(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 4)
	fd := f.failedDeal("C-9")
	steps := []func(*domain.InvoiceRequest){
		toC1,
		func(r *domain.InvoiceRequest) { toC1(r); r.Customer.Name = "Globex Corp" },
	}
	for i, m := range steps {
		if _, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, m), fmt.Sprintf("edit %d", i+1), alice); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "first try"}, bob); err != nil {
		t.Fatal(err)
	}
	if _, err := f.compensate(ctx, fd.req, "exhausted", "ERP down"); err != nil {
		t.Fatal(err)
	}
	third := func(r *domain.InvoiceRequest) { r.Customer.ID = "C-2" }
	if _, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, third), "edit 3", carol); err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "second try"}, bob); err != nil {
		t.Fatal(err)
	}

	dl := f.deadLetter(fd.dlID)
	if len(dl.Revisions) != 4 || dl.Revision != 3 || dl.Reinjects != 2 {
		t.Fatalf("%d revisions, revision %d, reinjects %d; want 4, 3, 2", len(dl.Revisions), dl.Revision, dl.Reinjects)
	}
	wantPatches := [][]string{nil, {"replace /customer/id"}, {"replace /customer/id", "replace /customer/name"}, {"replace /customer/id"}}
	wantActors := []string{"", "alice", "alice", "carol"}
	for i, r := range dl.Revisions {
		if r.Number != i || r.Actor != wantActors[i] {
			t.Errorf("revision %d: number %d, actor %q", i, r.Number, r.Actor)
		}
		if i > 0 {
			if got := patchOps(t, r.Patch); !slices.Equal(got, wantPatches[i]) {
				t.Errorf("revision %d patch %s: ops %v, want %v (against the original)", i, r.Patch, got, wantPatches[i])
			}
		}
	}
	var latest domain.InvoiceRequest
	if err := json.Unmarshal(dl.Payload, &latest); err != nil || latest.Customer.ID != "C-2" || latest.Customer.Name != fd.req.Customer.Name {
		t.Fatalf("current payload %s: %v", dl.Payload, err)
	}
	var types []string
	for _, e := range dl.History {
		types = append(types, e.Type)
	}
	want := []string{domain.TypeMessageDeadLettered, domain.TypeDeadLetterEdited, domain.TypeDeadLetterEdited, domain.TypeDeadLetterReinjected,
		domain.TypeDeadLetterReopened, domain.TypeDeadLetterEdited, domain.TypeDeadLetterReinjected}
	if !slices.Equal(types, want) {
		t.Fatalf("history %v, want %v", types, want)
	}
}

func patchOps(t *testing.T, patch json.RawMessage) []string {
	t.Helper()
	var ops []struct{ Op, Path string }
	if err := json.Unmarshal(patch, &ops); err != nil {
		t.Fatalf("patch %s: %v", patch, err)
	}
	var out []string
	for _, o := range ops {
		out = append(out, o.Op+" "+o.Path)
	}
	return out
}

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

// TestAuditRowPerAction: every operator action writes one audit row with
// actor, role, action, target, reason, hashes, the patch of an edit and the
// request id.
func TestAuditRowPerAction(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 4)
	if err := f.store.SetMakerChecker(ctx, true); err != nil {
		t.Fatal(err)
	}
	fd := f.failedDeal("C-9")
	rev, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, func(r *domain.InvoiceRequest) { toC1(r); cheaper(r) }), "discount agreed", alice)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.store.ApproveDeadLetter(ctx, fd.dlID, bob); err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "approved"}, carol); err != nil {
		t.Fatal(err)
	}
	other := f.failedDeal("C-9")
	if err := f.store.DiscardDeadLetter(ctx, other.dlID, "customer left", alice); err != nil {
		t.Fatal(err)
	}
	if err := f.store.AcknowledgeAlert(ctx, other.alertID, bob); err != nil {
		t.Fatal(err)
	}
	if err := f.store.ResolveAlert(ctx, other.alertID, "handled by sales", bob); err != nil {
		t.Fatal(err)
	}

	rows := f.audit(fd.dlID)
	if got, want := actions(rows), []string{"dead_letter.edit", "dead_letter.approve", "dead_letter.reinject"}; !slices.Equal(got, want) {
		t.Fatalf("audit of %s: %v, want %v", fd.dlID, got, want)
	}
	edit, approve, reinject := rows[0], rows[1], rows[2]
	orig := f.deadLetter(fd.dlID).Revisions[0].Payload
	check := func(what string, r postgres.AuditEntry, actor postgres.Actor, reason string) {
		t.Helper()
		if r.Actor != actor.Name || r.Role != actor.Role || r.TargetType != "dead_letter" || r.TargetID != fd.dlID || r.Reason != reason {
			t.Errorf("%s row: %+v; want actor %s (%s), target dead_letter %s, reason %q", what, r, actor.Name, actor.Role, fd.dlID, reason)
		}
		if actor.RequestID != "" && deref(r.RequestID) != actor.RequestID || actor.RequestID == "" && r.RequestID != nil {
			t.Errorf("%s row: request id %s, want %q", what, deref(r.RequestID), actor.RequestID)
		}
		if r.At.IsZero() || time.Since(r.At) > time.Minute {
			t.Errorf("%s row: time %v", what, r.At)
		}
	}
	check("edit", edit, alice, "discount agreed")
	check("approve", approve, bob, "revision 1")
	check("reinject", reinject, carol, "approved")
	if edit.BeforeHash == nil || edit.AfterHash == nil || *edit.BeforeHash == *edit.AfterHash {
		t.Errorf("edit hashes %s → %s: want two different hashes", deref(edit.BeforeHash), deref(edit.AfterHash))
	}
	if *edit.BeforeHash != canonicalSHA(t, orig) {
		t.Errorf("edit before hash %s is not the hash of the original payload", *edit.BeforeHash)
	}
	if *edit.AfterHash != canonicalSHA(t, rev.Payload) {
		t.Errorf("edit after hash %s is not the hash of the new revision", *edit.AfterHash)
	}
	if got := patchOps(t, edit.Diff); len(got) == 0 || !slices.Contains(got, "replace /customer/id") {
		t.Errorf("edit diff %s: want the revision's patch", edit.Diff)
	}
	if sameJSONBytes(edit.Diff, rev.Patch) != nil {
		t.Errorf("edit diff %s, want the revision's patch %s", edit.Diff, rev.Patch)
	}
	// The rows chain: each action starts from the content the previous one
	// left.
	if deref(approve.BeforeHash) != deref(edit.AfterHash) || deref(approve.AfterHash) != deref(edit.AfterHash) {
		t.Errorf("approve hashes %s → %s, want both the edited revision's %s", deref(approve.BeforeHash), deref(approve.AfterHash), deref(edit.AfterHash))
	}
	if deref(reinject.BeforeHash) != deref(edit.AfterHash) || reinject.AfterHash == nil {
		t.Errorf("reinject hashes %s → %s, want to start from %s", deref(reinject.BeforeHash), deref(reinject.AfterHash), deref(edit.AfterHash))
	}
	if approve.Diff != nil || reinject.Diff != nil || reinject.OperationID != nil {
		t.Errorf("approve/reinject rows carry a diff or an operation: %+v %+v", approve, reinject)
	}
	drows := f.audit(other.dlID)
	if len(drows) != 1 || drows[0].Action != "dead_letter.discard" || drows[0].Actor != "alice" || drows[0].Reason != "customer left" ||
		drows[0].BeforeHash == nil || drows[0].AfterHash != nil {
		t.Fatalf("discard audit %+v", drows)
	}
	arows := f.audit(other.alertID)
	if got, want := actions(arows), []string{"alert.acknowledge", "alert.resolve"}; !slices.Equal(got, want) {
		t.Fatalf("alert audit %v, want %v", got, want)
	}
	for _, r := range arows {
		if r.Actor != "bob" || r.TargetType != "alert" || deref(r.RequestID) != bob.RequestID || r.BeforeHash == nil || r.AfterHash == nil {
			t.Errorf("alert audit row %+v", r)
		}
	}
	if arows[1].Reason != "handled by sales" {
		t.Errorf("resolve reason %q", arows[1].Reason)
	}
	// Refusals write no row.
	n := count(t, ctx, f.pool, `SELECT count(*) FROM audit_log`)
	if err := f.store.AcknowledgeAlert(ctx, other.alertID, bob); !isStateConflict(err) {
		t.Errorf("acknowledge of a resolved alert: %v", err)
	}
	if err := f.store.ResolveAlert(ctx, other.alertID, "again", bob); !isStateConflict(err) {
		t.Errorf("resolve of a resolved alert: %v", err)
	}
	if err := f.store.ResolveAlert(ctx, fd.alertID, "", bob); fieldOf(err) != "reason" {
		t.Errorf("resolve without reason: %v", err)
	}
	if err := f.store.AcknowledgeAlert(ctx, watermill.NewUUID(), bob); !errors.Is(err, domain.ErrNotFound) {
		t.Errorf("acknowledge of an unknown alert: %v", err)
	}
	if m := count(t, ctx, f.pool, `SELECT count(*) FROM audit_log`); m != n {
		t.Errorf("refused actions wrote %d audit rows", m-n)
	}
}

// canonicalSHA is the sha256 of a JSON document in a canonical spelling
// (keys sorted, no spaces), as the audit log hashes payloads.
func canonicalSHA(t *testing.T, b []byte) string {
	t.Helper()
	var v any
	d := json.NewDecoder(strings.NewReader(string(b)))
	d.UseNumber()
	if err := d.Decode(&v); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	c, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return sha(c)
}

func sameJSONBytes(a, b []byte) error {
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		return err
	}
	if err := json.Unmarshal(b, &y); err != nil {
		return err
	}
	xb, _ := json.Marshal(x)
	yb, _ := json.Marshal(y)
	if string(xb) != string(yb) {
		return fmt.Errorf("%s != %s", xb, yb)
	}
	return nil
}

// TestAuditInTheActionsTransaction: the audit row is written inside the
// action's transaction — the hook before COMMIT sees it — and a failure
// after it leaves neither the action nor the row.
func TestAuditInTheActionsTransaction(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 4)
	fd := f.failedDeal("C-9")
	var (
		mu     sync.Mutex
		inTxN  int
		errHit = errors.New("injected failure before commit")
	)
	failing := postgres.NewStore(f.pool, postgres.WithBeforeCommit(func(ctx context.Context, tx pgx.Tx) error {
		var n int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM audit_log`).Scan(&n); err != nil {
			return err
		}
		mu.Lock()
		inTxN = n
		mu.Unlock()
		return errHit
	}))
	base := count(t, ctx, f.pool, `SELECT count(*) FROM audit_log`)
	acts := map[string]func() error{
		"edit": func() error {
			_, err := failing.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, toC1), "fix", alice)
			return err
		},
		"reinject": func() error {
			_, err := failing.ReinjectDeadLetter(ctx, fd.dlID, postgres.ReinjectOptions{Reason: "go"}, bob)
			return err
		},
		"discard":     func() error { return failing.DiscardDeadLetter(ctx, fd.dlID, "give up", bob) },
		"acknowledge": func() error { return failing.AcknowledgeAlert(ctx, fd.alertID, bob) },
		"resolve":     func() error { return failing.ResolveAlert(ctx, fd.alertID, "done", bob) },
		"bulk start": func() error {
			_, _, err := failing.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "all", bob)
			return err
		},
	}
	for name, act := range acts {
		before := dlqDump(t, ctx, f.pool)
		mu.Lock()
		inTxN = -1
		mu.Unlock()
		if err := act(); !errors.Is(err, errHit) {
			t.Errorf("%s: %v, want the injected failure", name, err)
			continue
		}
		mu.Lock()
		seen := inTxN
		mu.Unlock()
		if seen != base+1 {
			t.Errorf("%s: the transaction held %d audit rows before commit, want %d: the row is not written with the action", name, seen, base+1)
		}
		dlqAssertUnchanged(t, before, dlqDump(t, ctx, f.pool))
	}
	// Approve, with a pending money edit.
	if err := f.store.SetMakerChecker(ctx, true); err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.EditDeadLetter(ctx, fd.dlID, payloadJSON(t, fd.req, cheaper), "discount", alice); err != nil {
		t.Fatal(err)
	}
	base++
	before := dlqDump(t, ctx, f.pool)
	if err := failing.ApproveDeadLetter(ctx, fd.dlID, bob); !errors.Is(err, errHit) {
		t.Fatalf("approve: %v", err)
	}
	if inTxN != base+1 {
		t.Errorf("approve: %d audit rows inside the transaction, want %d", inTxN, base+1)
	}
	dlqAssertUnchanged(t, before, dlqDump(t, ctx, f.pool))
}

// TestAuditLogIsAppendOnly: UPDATE, DELETE and TRUNCATE are refused.
func TestAuditLogIsAppendOnly(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 4)
	fd := f.failedDeal("C-9")
	if err := f.store.DiscardDeadLetter(ctx, fd.dlID, "test", alice); err != nil {
		t.Fatal(err)
	}
	before := dlqDump(t, ctx, f.pool)["audit_log"]
	for _, sql := range []string{
		`UPDATE audit_log SET actor='mallory'`,
		`UPDATE audit_log SET reason='' WHERE false OR true`,
		`DELETE FROM audit_log`,
		`TRUNCATE audit_log`,
		`TRUNCATE audit_log RESTART IDENTITY CASCADE`,
	} {
		_, err := f.pool.Exec(ctx, sql)
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, "append-only") {
			t.Errorf("%s: %v, want refused as append-only (42501)", sql, err)
		}
	}
	if after := dlqDump(t, ctx, f.pool)["audit_log"]; after != before || before == "" {
		t.Fatalf("audit log changed:\n%s\n→\n%s", before, after)
	}
}

// dlqTables are the tables operator actions write.
var dlqTables = map[string]string{
	"events":               "position",
	"deals":                "id",
	"inventory":            "sku",
	"invoice_sagas":        "idempotency_key",
	"watermill_outbox":     `"offset"`,
	"dead_letters":         "id",
	"alerts":               "id",
	"audit_log":            "id",
	"bulk_operations":      "id",
	"bulk_operation_items": "operation_id, seq",
	"settings":             "key",
}

func dlqDump(t *testing.T, ctx context.Context, q postgres.Querier) map[string]string {
	t.Helper()
	st := map[string]string{}
	for table, order := range dlqTables {
		var s string
		if err := q.QueryRow(ctx, fmt.Sprintf(`SELECT coalesce(string_agg(t::text, E'\n' ORDER BY %s), '') FROM %s t`, order, table)).Scan(&s); err != nil {
			t.Fatalf("dump %s: %v", table, err)
		}
		st[table] = s
	}
	return st
}

func dlqAssertUnchanged(t *testing.T, before, after map[string]string) {
	t.Helper()
	for table := range dlqTables {
		if before[table] != after[table] {
			t.Errorf("table %s changed:\nbefore:\n%s\nafter:\n%s", table, clipText(before[table]), clipText(after[table]))
		}
	}
}

func clipText(s string) string {
	if len(s) > 4000 {
		return "…" + s[len(s)-4000:]
	}
	return s
}

// makeBulkEntries makes deals × perDeal open entries: per deal the
// compensation's entry (class permanent) and perDeal-1 more for the same
// close (poison copies of its message: classes poison and exhausted), all
// re-injectable — the first re-instates the deal, the others join its saga.
func makeBulkEntries(t *testing.T, f *dlqFixture, deals, perDeal int) map[string][]string {
	t.Helper()
	ctx := t.Context()
	byDeal := map[string][]string{}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i := range deals {
		g.Go(func() error {
			fd, err := f.tryFailedDeal(gctx, fmt.Sprintf("C-%d", i), 1)
			if err != nil {
				return err
			}
			ids := []string{fd.dlID}
			payload, _ := json.Marshal(fd.req)
			for j := 1; j < perDeal; j++ {
				class := domain.ClassExhausted
				if j%3 == 0 {
					class = domain.ClassPoison
				}
				now := time.Now()
				res, err := f.store.DeadLetter(gctx, fd.deal.ID, fd.req.IdempotencyKey,
					postgres.Failure{ErrorClass: class, Reason: fmt.Sprintf("copy %d", j), Attempts: 1, FirstFailureAt: now, LastFailureAt: now},
					postgres.DeadLetterSource{MessageUUID: watermill.NewUUID(), Topic: outbox.InvoiceTopic, Handler: "invoice-saga",
						Payload: payload, Metadata: map[string]string{outbox.MetadataIdempotencyKey: fd.req.IdempotencyKey}}, meta)
				if err != nil {
					return err
				}
				ids = append(ids, res.DeadLetterID)
			}
			mu.Lock()
			byDeal[fd.deal.ID] = ids
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	return byDeal
}

// TestBulkReinjectCrashAndResume: 300 entries across 30 deals (the 1,000
// across 100 of the issue run as processes in integration/dlq_test.go). The
// dry run counts them by class; the run is interrupted (its context
// cancelled) after 100 and resumed: every entry is re-injected exactly once,
// in per-deal order, and every audit row carries the one operation id.
func TestBulkReinjectCrashAndResume(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const deals, perDeal = 30, 10
	f := newDLQFixture(t, 12)
	start := time.Now()
	byDeal := makeBulkEntries(t, f, deals, perDeal)
	t.Logf("made %d entries in %v", deals*perDeal, time.Since(start))

	plan, err := f.store.PlanBulkReinject(ctx, postgres.DeadLetterFilter{})
	if err != nil {
		t.Fatal(err)
	}
	wantHist := map[string]int{"permanent": deals, domain.ClassPoison: deals * 3, domain.ClassExhausted: deals * 6}
	if plan.Count != deals*perDeal || fmt.Sprint(plan.ByErrorClass) != fmt.Sprint(wantHist) {
		t.Fatalf("dry run %+v, want %d by class %v", plan, deals*perDeal, wantHist)
	}
	if p, err := f.store.PlanBulkReinject(ctx, postgres.DeadLetterFilter{ErrorClass: domain.ClassPoison}); err != nil || p.Count != deals*3 {
		t.Fatalf("dry run of poison only: %+v %v", p, err)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE type=$1`, domain.TypeDeadLetterReinjected); n != 0 {
		t.Fatalf("the dry run re-injected %d", n)
	}

	op, total, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "ERP fixed", carol)
	if err != nil || total != deals*perDeal {
		t.Fatalf("start: %s %d %v", op, total, err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	start = time.Now()
	p, err := f.store.RunBulkReinject(runCtx, op, 0, 0, func(p postgres.BulkProgress) {
		if p.Done >= 100 {
			cancel()
		}
	})
	cancel()
	if err != nil {
		t.Fatalf("interrupted run: %v, want its progress and no error", err)
	}
	if p.Done < 100 || p.Pending == 0 || p.Done+p.Pending != total || p.Skipped != 0 {
		t.Fatalf("interrupted run stopped at %+v, want 100 or a few more done and the rest pending", p)
	}
	t.Logf("interrupted after %d in %v", p.Done, time.Since(start))
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE type=$1`, domain.TypeDeadLetterReinjected); n != p.Done {
		t.Fatalf("%d entries re-injected, but the operation says %d done", n, p.Done)
	}
	p, err = f.store.RunBulkReinject(ctx, op, 0, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.Done != total || p.Pending != 0 || p.Skipped != 0 {
		t.Fatalf("resumed run: %+v, want all %d done", p, total)
	}
	t.Logf("bulk run of %d took %v", total, time.Since(start))
	checkBulkExactlyOnce(t, f, op, byDeal)
	// Running it again finds nothing to do.
	if p, err := f.store.RunBulkReinject(ctx, op, 0, 0, nil); err != nil || p.Done != total {
		t.Fatalf("third run: %+v %v", p, err)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE type=$1`, domain.TypeDeadLetterReinjected); n != total {
		t.Fatalf("%d re-injects after a third run, want %d", n, total)
	}
}

// checkBulkExactlyOnce checks that operation op re-injected every entry of
// byDeal exactly once, each deal's entries in their (created_at, id) order,
// and that every audit row of it carries op.
func checkBulkExactlyOnce(t *testing.T, f *dlqFixture, op string, byDeal map[string][]string) {
	t.Helper()
	ctx := t.Context()
	all := 0
	for _, ids := range byDeal {
		all += len(ids)
	}
	rows, err := f.pool.Query(ctx, `SELECT d.id::text, d.deal_id::text, d.state, d.reinjects,
			(SELECT count(*) FROM events e WHERE e.stream_id = 'deadletter-' || d.id AND e.type = 'DeadLetterReinjected'
				AND e.payload->>'operation_id' = $1)
		FROM dead_letters d ORDER BY d.created_at, d.id`, op)
	if err != nil {
		t.Fatal(err)
	}
	type dlRow struct {
		id, deal, state string
		reinjects, evs  int
	}
	dls, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (dlRow, error) {
		var x dlRow
		return x, r.Scan(&x.id, &x.deal, &x.state, &x.reinjects, &x.evs)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(dls) != all {
		t.Fatalf("%d dead letters, want %d", len(dls), all)
	}
	wantOrder := map[string][]string{}
	for _, d := range dls {
		if d.state != domain.DLStateReinjected || d.reinjects != 1 || d.evs != 1 {
			t.Errorf("entry %s: state %s, reinjects %d, %d re-inject events of the operation; want reinjected, 1, 1", d.id, d.state, d.reinjects, d.evs)
		}
		wantOrder[d.deal] = append(wantOrder[d.deal], d.id)
	}
	msgs := reinjectedMessages(t, ctx, f.pool)
	if len(msgs) != all {
		t.Fatalf("%d re-injected messages, want %d", len(msgs), all)
	}
	gotOrder := map[string][]string{}
	seen := map[string]bool{}
	for _, m := range msgs {
		from := m.Metadata[outbox.MetadataReinjectedFrom]
		if seen[from] {
			t.Errorf("entry %s published twice", from)
		}
		seen[from] = true
		var req domain.InvoiceRequest
		if err := json.Unmarshal(m.Payload, &req); err != nil {
			t.Fatal(err)
		}
		gotOrder[req.DealID] = append(gotOrder[req.DealID], from)
	}
	for deal, ids := range byDeal {
		if len(wantOrder[deal]) != len(ids) {
			t.Errorf("deal %s: %d entries listed, want %d", deal, len(wantOrder[deal]), len(ids))
		}
		if !slices.Equal(gotOrder[deal], wantOrder[deal]) {
			t.Errorf("deal %s: published in order %v, want %v", deal, gotOrder[deal], wantOrder[deal])
		}
	}
	var auditN, auditOp, distinctOps int
	if err := f.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE operation_id = $1), count(DISTINCT operation_id)
		FROM audit_log WHERE action LIKE 'dead_letter.%reinject%'`, op).Scan(&auditN, &auditOp, &distinctOps); err != nil {
		t.Fatal(err)
	}
	if auditN != all+1 || auditOp != all+1 || distinctOps != 1 {
		t.Errorf("audit: %d re-inject rows, %d with operation %s, %d operations; want %d (start + one per entry), all of them, 1",
			auditN, auditOp, op, distinctOps, all+1)
	}
	// Each deal was re-instated once and the others joined its saga.
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE type=$1`, domain.TypeDealReinstated); n != len(byDeal) {
		t.Errorf("%d deals re-instated, want %d", n, len(byDeal))
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM deals WHERE status <> 'won'`); n != 0 {
		t.Errorf("%d deals not won after the bulk re-inject", n)
	}
}

// TestBulkReinjectSkipsRefusedAndRateLimits: an entry discarded after the
// plan is skipped with the reason; the rate limit holds.
func TestBulkReinjectSkipsRefusedAndRateLimits(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 6)
	var ids []string
	for range 4 {
		ids = append(ids, f.failedDeal("C-9").dlID)
	}
	if _, _, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "", carol); fieldOf(err) != "reason" {
		t.Fatalf("start without a reason: %v", err)
	}
	if _, _, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "x", postgres.Actor{}); fieldOf(err) != "actor" {
		t.Fatalf("start without an actor: %v", err)
	}
	if _, _, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{DealID: "nope"}, "x", carol); fieldOf(err) != "deal_id" {
		t.Fatalf("start with a bad filter: %v", err)
	}
	op, total, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "retry all", carol)
	if err != nil || total != 4 {
		t.Fatalf("start: %d %v", total, err)
	}
	if err := f.store.DiscardDeadLetter(ctx, ids[1], "not worth it", alice); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	p, err := f.store.RunBulkReinject(ctx, op, 10, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < 250*time.Millisecond {
		t.Errorf("4 items at 10/s took %v, want at least 300ms", took)
	}
	if p.Done != 3 || p.Skipped != 1 || p.Pending != 0 {
		t.Fatalf("progress %+v, want 3 done and 1 skipped", p)
	}
	var detail string
	if err := f.pool.QueryRow(ctx, `SELECT detail FROM bulk_operation_items WHERE operation_id=$1 AND dead_letter_id=$2 AND state='skipped'`,
		op, ids[1]).Scan(&detail); err != nil || !strings.Contains(detail, "discarded") {
		t.Fatalf("skipped item detail %q: %v", detail, err)
	}
	if _, err := f.store.RunBulkReinject(ctx, watermill.NewUUID(), 0, 0, nil); !errors.Is(err, domain.ErrNotFound) {
		t.Fatalf("run of an unknown operation: %v", err)
	}
	if got := actions(f.audit(ids[1])); !slices.Equal(got, []string{"dead_letter.discard"}) {
		t.Fatalf("the skipped entry's audit: %v", got)
	}
}

func listAll(t *testing.T, s *postgres.Store, f postgres.DeadLetterFilter, limit int) []postgres.DeadLetterView {
	t.Helper()
	var out []postgres.DeadLetterView
	var cur postgres.Cursor
	for pages := 0; ; pages++ {
		p, err := s.ListDeadLetters(t.Context(), f, cur, limit)
		if err != nil {
			t.Fatal(err)
		}
		if len(p.Items) > limit {
			t.Fatalf("page of %d items with limit %d", len(p.Items), limit)
		}
		out = append(out, p.Items...)
		if p.Next == "" {
			return out
		}
		if len(p.Items) != limit {
			t.Fatalf("a page of %d (limit %d) with a next cursor", len(p.Items), limit)
		}
		cur = p.Next
		if pages > 100000 {
			t.Fatal("pagination does not end")
		}
	}
}

func ids(vs []postgres.DeadLetterView) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = v.ID
	}
	return out
}

// TestListDeadLettersFiltersAndPages: every filter, and keyset pages that
// return each entry exactly once, newest first.
func TestListDeadLettersFiltersAndPages(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 6)
	var fds []failed
	for range 5 {
		fds = append(fds, f.failedDeal("C-9"))
	}
	mid := time.Now()
	time.Sleep(5 * time.Millisecond)
	now := time.Now()
	poison, err := f.store.DeadLetter(ctx, "", "", postgres.Failure{ErrorClass: domain.ClassPoison, Reason: "cannot decode envelope garbage",
		Attempts: 1, FirstFailureAt: now, LastFailureAt: now},
		postgres.DeadLetterSource{MessageUUID: "m-poison", Topic: outbox.AlertTopic, Handler: "alert-webhook", Payload: []byte("garbage")}, meta)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.store.DiscardDeadLetter(ctx, fds[0].dlID, "dup", alice); err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.ReinjectDeadLetter(ctx, fds[1].dlID, postgres.ReinjectOptions{Reason: "go"}, alice); err != nil {
		t.Fatal(err)
	}

	all := listAll(t, f.store, postgres.DeadLetterFilter{}, 1000)
	if len(all) != 6 {
		t.Fatalf("%d entries, want 6", len(all))
	}
	for i := 1; i < len(all); i++ {
		a, b := all[i-1], all[i]
		if a.CreatedAt.Before(b.CreatedAt) || a.CreatedAt.Equal(b.CreatedAt) && a.ID < b.ID {
			t.Fatalf("not newest first: %v %s before %v %s", a.CreatedAt, a.ID, b.CreatedAt, b.ID)
		}
	}
	if all[0].ID != poison.DeadLetterID || all[0].Payload != nil || all[0].PayloadText == nil || *all[0].PayloadText != "garbage" {
		t.Fatalf("newest %+v: want the poison entry with its text payload", all[0])
	}
	for _, limit := range []int{1, 2, 4} {
		if got := ids(listAll(t, f.store, postgres.DeadLetterFilter{}, limit)); !slices.Equal(got, ids(all)) {
			t.Errorf("pages of %d: %v, want %v", limit, got, ids(all))
		}
	}
	cases := []struct {
		name string
		f    postgres.DeadLetterFilter
		want []string
	}{
		{"open", postgres.DeadLetterFilter{State: "open"}, []string{poison.DeadLetterID, fds[4].dlID, fds[3].dlID, fds[2].dlID}},
		{"discarded", postgres.DeadLetterFilter{State: "discarded"}, []string{fds[0].dlID}},
		{"reinjected", postgres.DeadLetterFilter{State: "reinjected"}, []string{fds[1].dlID}},
		{"class", postgres.DeadLetterFilter{ErrorClass: domain.ClassPoison}, []string{poison.DeadLetterID}},
		{"reason words", postgres.DeadLetterFilter{Reason: "Unknown  customer"}, []string{fds[4].dlID, fds[3].dlID, fds[2].dlID, fds[1].dlID, fds[0].dlID}},
		{"reason word in any order", postgres.DeadLetterFilter{Reason: "envelope cannot"}, []string{poison.DeadLetterID}},
		{"reason no match", postgres.DeadLetterFilter{Reason: "timeout"}, nil},
		{"deal", postgres.DeadLetterFilter{DealID: fds[2].deal.ID}, []string{fds[2].dlID}},
		{"topic", postgres.DeadLetterFilter{Topic: outbox.AlertTopic}, []string{poison.DeadLetterID}},
		{"handler", postgres.DeadLetterFilter{Handler: "invoice-saga", State: "open"}, []string{fds[4].dlID, fds[3].dlID, fds[2].dlID}},
		{"since", postgres.DeadLetterFilter{Since: mid}, []string{poison.DeadLetterID}},
		{"until", postgres.DeadLetterFilter{Until: mid, State: "open"}, []string{fds[4].dlID, fds[3].dlID, fds[2].dlID}},
		{"window", postgres.DeadLetterFilter{Since: all[4].CreatedAt, Until: all[2].CreatedAt}, []string{all[3].ID, all[4].ID}},
		{"combined", postgres.DeadLetterFilter{State: "open", ErrorClass: "permanent", DealID: fds[3].deal.ID}, []string{fds[3].dlID}},
	}
	for _, c := range cases {
		for _, limit := range []int{1, 3, 100} {
			if got := ids(listAll(t, f.store, c.f, limit)); !slices.Equal(got, c.want) {
				t.Errorf("%s (pages of %d): %v, want %v", c.name, limit, got, c.want)
			}
		}
	}
	bad := []struct {
		name   string
		f      postgres.DeadLetterFilter
		cursor postgres.Cursor
		limit  int
		field  string
	}{
		{"cursor not base64", postgres.DeadLetterFilter{}, "!!!", 10, "cursor"},
		{"cursor of garbage", postgres.DeadLetterFilter{}, "Z2FyYmFnZQ", 10, "cursor"},
		{"limit 0", postgres.DeadLetterFilter{}, "", 0, "limit"},
		{"limit too big", postgres.DeadLetterFilter{}, "", 1001, "limit"},
		{"state", postgres.DeadLetterFilter{State: "lost"}, "", 10, "state"},
		{"deal", postgres.DeadLetterFilter{DealID: "x"}, "", 10, "deal_id"},
		{"window", postgres.DeadLetterFilter{Since: mid, Until: mid}, "", 10, "until"},
	}
	for _, b := range bad {
		if _, err := f.store.ListDeadLetters(ctx, b.f, b.cursor, b.limit); fieldOf(err) != b.field {
			t.Errorf("%s: %v, want a validation error naming %q", b.name, err, b.field)
		}
	}
}

// TestListDeadLettersDeepPageAt100k: at 100,000 entries (with ties in
// created_at) a full keyset walk returns each entry once, in order, and a
// deep page is an index scan on dead_letters_page_idx as cheap as the
// first.
func TestListDeadLettersDeepPageAt100k(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const n = 100_000
	// The store's queries are traced, so that the plan checked below is
	// the one of the statement ListDeadLetters really runs.
	cfg, err := pgxpool.ParseConfig(pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 4
	tracer := &lastQuery{match: "FROM dead_letters WHERE"}
	cfg.ConnConfig.Tracer = tracer
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	store := postgres.NewStore(pool)
	start := time.Now()
	if _, err := pool.Exec(ctx, `INSERT INTO dead_letters (id, state, deal_id, idempotency_key, message_uuid, topic, handler, payload,
			metadata, reason, error_class, attempts, first_failure_at, last_failure_at, version, created_at, updated_at)
		SELECT gen_random_uuid(), CASE WHEN i % 10 = 0 THEN 'discarded' ELSE 'open' END, NULL, NULL, 'm-' || i,
			'invoice-requests', 'invoice-saga', convert_to('{"n":' || i || '}', 'UTF8'), '{}'::jsonb,
			'unknown customer C-' || (i % 100), (ARRAY['permanent','exhausted','poison'])[i % 3 + 1], 1, ts, ts, 1, ts, ts
		FROM (SELECT i, timestamptz '2026-01-01 00:00:00Z' + (i / 3) * interval '1 millisecond' AS ts
			FROM generate_series(1, $1) AS i) s`, n); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `ANALYZE dead_letters`); err != nil {
		t.Fatal(err)
	}
	t.Logf("inserted %d entries in %v", n, time.Since(start))

	const limit, deep = 1000, 90_000
	sqlIDs := func(offset, max int) []string {
		t.Helper()
		rows, err := pool.Query(ctx, `SELECT id::text FROM dead_letters ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT $2`, offset, max)
		if err != nil {
			t.Fatal(err)
		}
		out, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	t0 := time.Now()
	p1, err := store.ListDeadLetters(ctx, postgres.DeadLetterFilter{}, "", limit)
	first := time.Since(t0)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := store.ListDeadLetters(ctx, postgres.DeadLetterFilter{}, p1.Next, limit)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := append(ids(p1.Items), ids(p2.Items)...), sqlIDs(0, 2*limit); !slices.Equal(got, want) {
		t.Fatalf("the first two pages are not the first %d entries in (created_at, id) descending order", 2*limit)
	}
	// A cursor 90,000 entries deep, as the page before would hand it out;
	// from there the walk returns the last 10,000 entries, each once, in
	// order (ties in created_at included).
	var deepAt time.Time
	var deepID string
	if err := pool.QueryRow(ctx, `SELECT created_at, id::text FROM dead_letters ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1`,
		deep-1).Scan(&deepAt, &deepID); err != nil {
		t.Fatal(err)
	}
	deepCursor := postgres.Cursor(base64.RawURLEncoding.EncodeToString([]byte(deepAt.UTC().Format(time.RFC3339Nano) + "|" + deepID)))
	var (
		walked  []string
		deepest time.Duration
	)
	var deepSQL string
	var deepArgs []any
	for cur, page := deepCursor, 0; ; page++ {
		t0 := time.Now()
		p, err := store.ListDeadLetters(ctx, postgres.DeadLetterFilter{}, cur, limit)
		if page == 0 {
			deepest = time.Since(t0)
			deepSQL, deepArgs = tracer.get()
		}
		if err != nil {
			t.Fatal(err)
		}
		walked = append(walked, ids(p.Items)...)
		if p.Next == "" {
			break
		}
		if page > n/limit {
			t.Fatal("pagination does not end")
		}
		cur = p.Next
	}
	if want := sqlIDs(deep, n); !slices.Equal(walked, want) {
		t.Fatalf("walk from a deep cursor: %d entries, want the last %d in order", len(walked), len(want))
	}
	t.Logf("first page %v, page at %d %v", first, deep, deepest)
	if deepest > 20*first+200*time.Millisecond {
		t.Errorf("the page at %d took %v, the first %v: a deep page should cost what the first does", deep, deepest, first)
	}

	// The plan of the deep page's statement, as ListDeadLetters ran it.
	if !strings.Contains(deepSQL, "ORDER BY") || len(deepArgs) != 3 {
		t.Fatalf("traced statement %q with %d args: not the listing", deepSQL, len(deepArgs))
	}
	explain := func(opts string) string {
		t.Helper()
		rows, err := pool.Query(ctx, "EXPLAIN ("+opts+") "+deepSQL, deepArgs...)
		if err != nil {
			t.Fatal(err)
		}
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(lines, "\n")
	}
	plan := explain("FORMAT TEXT")
	if !strings.Contains(plan, "Index Scan using dead_letters_page_idx") || strings.Contains(plan, "Sort") {
		t.Fatalf("deep page plan:\n%s\nwant an index scan on dead_letters_page_idx and no sort", plan)
	}
	plan = explain("ANALYZE, BUFFERS, FORMAT TEXT")
	t.Logf("deep page plan:\n%s", plan)
	// The index finds the start: no row before the cursor is read.
	if strings.Contains(plan, "Rows Removed by Filter") {
		t.Errorf("the deep page filters rows instead of seeking:\n%s", plan)
	}
}

// lastQuery is a pgx tracer that keeps the last statement containing
// match, with its arguments.
type lastQuery struct {
	match string
	mu    sync.Mutex
	sql   string
	args  []any
}

func (q *lastQuery) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if strings.Contains(d.SQL, q.match) && !strings.HasPrefix(d.SQL, "EXPLAIN") {
		q.mu.Lock()
		q.sql, q.args = d.SQL, slices.Clone(d.Args)
		q.mu.Unlock()
	}
	return ctx
}

func (q *lastQuery) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (q *lastQuery) get() (string, []any) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.sql, q.args
}

// TestFixAPoisonTextPayload: a message whose payload is not even JSON (a
// poison copy of a won deal's invoice request) is fixed by an edit that
// replaces the whole document, and re-injected into the deal's saga.
func TestFixAPoisonTextPayload(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newDLQFixture(t, 4)
	d, err := f.store.CreateDeal(ctx, domain.Customer{ID: "C-1", Name: "Globex"}, "USD",
		[]domain.Line{{SKU: dlSKU, Description: "Widget", Quantity: 1, UnitPrice: "495.00"}}, meta)
	if err != nil {
		t.Fatal(err)
	}
	if d, err = f.store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); err != nil {
		t.Fatal(err)
	}
	req := invoiceRequestOf(d)
	now := time.Now()
	res, err := f.store.DeadLetter(ctx, "", req.IdempotencyKey,
		postgres.Failure{ErrorClass: domain.ClassPoison, Reason: "cannot decode invoice request", Attempts: 1, FirstFailureAt: now, LastFailureAt: now},
		postgres.DeadLetterSource{MessageUUID: "m-garbled", Topic: outbox.InvoiceTopic, Handler: "invoice-saga",
			Payload: []byte("deal_id=" + d.ID + "; garbled"), Metadata: map[string]string{outbox.MetadataIdempotencyKey: req.IdempotencyKey}}, meta)
	if err != nil {
		t.Fatal(err)
	}
	if v := f.deadLetter(res.DeadLetterID); v.PayloadText == nil || v.Payload != nil {
		t.Fatalf("poison entry: payload %s, text %v", v.Payload, v.PayloadText)
	}
	rev, err := f.store.EditDeadLetter(ctx, res.DeadLetterID, payloadJSON(t, req, nil), "rewrote the garbled payload", alice)
	if err != nil {
		t.Fatalf("edit of a non-JSON payload: %v", err)
	}
	if got := patchOps(t, rev.Patch); !slices.Equal(got, []string{"replace "}) {
		t.Fatalf("patch %s: want one replace of the whole document", rev.Patch)
	}
	out, err := f.store.ReinjectDeadLetter(ctx, res.DeadLetterID, postgres.ReinjectOptions{Reason: "fixed"}, bob)
	if err != nil {
		t.Fatalf("re-inject of the fixed entry: %v", err)
	}
	if out.DealID != d.ID || out.IdempotencyKey != req.IdempotencyKey {
		t.Fatalf("re-inject %+v", out)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE type = $1`, domain.TypeDealReinstated); n != 0 {
		t.Fatalf("a won deal was re-instated %d times: the fixed message joins its saga", n)
	}
}
