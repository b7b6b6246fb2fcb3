package postgres_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
	"github.com/dealbridge/dealbridge/projections"
)

// TestBulkReinjectUnlimitedSkipsRefusedInBatches: without a rate limit the
// run re-injects several entries per transaction on several connections;
// entries discarded after the plan, in the middle of a deal's entries, are
// skipped with the reason while the other entries of their batch are kept,
// every other entry is re-injected exactly once, and each deal's entries
// are published in their order.
func TestBulkReinjectUnlimitedSkipsRefusedInBatches(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const deals, perDeal = 12, 6
	f := newDLQFixture(t, 8)
	byDeal := makeBulkEntries(t, f, deals, perDeal)
	op, total, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "ERP fixed", carol)
	if err != nil || total != deals*perDeal {
		t.Fatalf("start: %d %v", total, err)
	}
	// The entries in (created_at, id) order per deal, as the run must
	// publish them.
	rows, err := f.pool.Query(ctx, `SELECT deal_id::text, id::text FROM dead_letters ORDER BY created_at, id`)
	if err != nil {
		t.Fatal(err)
	}
	order := map[string][]string{}
	for rows.Next() {
		var deal, id string
		if err := rows.Scan(&deal, &id); err != nil {
			t.Fatal(err)
		}
		order[deal] = append(order[deal], id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	discarded := map[string]bool{}
	i := 0
	for deal := range byDeal {
		if i++; i%3 != 0 {
			continue
		}
		id := order[deal][2]
		if err := f.store.DiscardDeadLetter(ctx, id, "not worth it", alice); err != nil {
			t.Fatal(err)
		}
		discarded[id] = true
	}

	p, err := f.store.RunBulkReinject(ctx, op, 0, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.Done != total-len(discarded) || p.Skipped != len(discarded) || p.Pending != 0 {
		t.Fatalf("progress %+v, want %d done and %d skipped", p, total-len(discarded), len(discarded))
	}
	skipped, err := f.pool.Query(ctx, `SELECT dead_letter_id::text, detail FROM bulk_operation_items WHERE operation_id=$1 AND state='skipped'`, op)
	if err != nil {
		t.Fatal(err)
	}
	for skipped.Next() {
		var id, detail string
		if err := skipped.Scan(&id, &detail); err != nil {
			t.Fatal(err)
		}
		if !discarded[id] || !strings.Contains(detail, "discarded") {
			t.Errorf("skipped %s (%q), which was not discarded", id, detail)
		}
	}
	if err := skipped.Err(); err != nil {
		t.Fatal(err)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE type=$1 AND payload->>'operation_id' = $2`,
		domain.TypeDeadLetterReinjected, op); n != p.Done {
		t.Fatalf("%d re-inject events of the operation, want %d", n, p.Done)
	}
	published := map[string][]string{}
	seen := map[string]bool{}
	for _, m := range reinjectedMessages(t, ctx, f.pool) {
		from := m.Metadata[outbox.MetadataReinjectedFrom]
		if seen[from] || discarded[from] {
			t.Errorf("entry %s published twice or despite its discard", from)
		}
		seen[from] = true
		var req domain.InvoiceRequest
		if err := json.Unmarshal(m.Payload, &req); err != nil {
			t.Fatal(err)
		}
		published[req.DealID] = append(published[req.DealID], from)
	}
	for deal, ids := range order {
		want := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return discarded[id] })
		if !slices.Equal(published[deal], want) {
			t.Errorf("deal %s: published %v, want %v", deal, published[deal], want)
		}
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM deals WHERE status <> 'won'`); n != 0 {
		t.Errorf("%d deals not won after the bulk re-inject", n)
	}
}

// TestBulkReinjectQueuedWriteFailure: an entry's audit row and outbox
// message are sent with the next entry's reads (or with the marking of the
// batch's items), so their failure is reported late. It must still fail
// the run with nothing of the failed batch kept, the entry still open and
// pending; a run after the cause is gone re-injects every entry exactly
// once, in per-deal order.
func TestBulkReinjectQueuedWriteFailure(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const deals, perDeal = 6, 5
	f := newDLQFixture(t, 8)
	byDeal := makeBulkEntries(t, f, deals, perDeal)
	op, total, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "ERP fixed", carol)
	if err != nil || total != deals*perDeal {
		t.Fatalf("start: %d %v", total, err)
	}
	var victim string
	for _, ids := range byDeal {
		victim = ids[2] // joins the saga its deal's first entry resumed
		break
	}
	if _, err := f.pool.Exec(ctx, `CREATE FUNCTION fail_audit() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.target_id = '`+victim+`' THEN
				RAISE EXCEPTION 'injected audit failure';
			END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER fail_audit BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION fail_audit()`); err != nil {
		t.Fatal(err)
	}

	if _, err := f.store.RunBulkReinject(ctx, op, 0, 0, nil); err == nil ||
		!strings.Contains(err.Error(), "cannot write audit log") || !strings.Contains(err.Error(), "injected audit failure") {
		t.Fatalf("run: %v, want the audit failure", err)
	}
	var itemState, dlState string
	if err := f.pool.QueryRow(ctx, `SELECT i.state, d.state FROM bulk_operation_items i JOIN dead_letters d ON d.id = i.dead_letter_id
		WHERE i.operation_id=$1 AND i.dead_letter_id=$2`, op, victim).Scan(&itemState, &dlState); err != nil {
		t.Fatal(err)
	}
	if itemState != "pending" || dlState != domain.DLStateOpen {
		t.Errorf("after the failed run the entry is %s and its item %s, want open and pending", dlState, itemState)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE stream_id = $1 AND type = $2`,
		domain.DeadLetterStream(victim), domain.TypeDeadLetterReinjected); n != 0 {
		t.Errorf("%d re-inject events for the entry whose audit row failed, want 0", n)
	}
	for _, m := range reinjectedMessages(t, ctx, f.pool) {
		if m.Metadata[outbox.MetadataReinjectedFrom] == victim {
			t.Errorf("entry %s published although its transaction failed", victim)
		}
	}

	if _, err := f.pool.Exec(ctx, `DROP TRIGGER fail_audit ON audit_log`); err != nil {
		t.Fatal(err)
	}
	p, err := f.store.RunBulkReinject(ctx, op, 0, 0, nil)
	if err != nil || p.Done != total || p.Pending != 0 {
		t.Fatalf("resumed run: %+v, %v", p, err)
	}
	checkBulkExactlyOnce(t, f, op, byDeal)
}

// TestBulkReinjectBatchReinstatesSeveralDeals: a batch reads its entries,
// deals, inventory rows and sagas ahead, and may reinstate several deals
// of common SKUs, each entry seeing the deals and stock as the entries
// before it in the batch left them. With every entry on one worker (an
// entry without a deal keeps one global order), the run must end as
// re-injecting the entries one by one would: every deal won once, each
// SKU's stock allocated once per deal with its stream versions in order,
// the hash chains intact, and the projections equal to a replay of the log.
func TestBulkReinjectBatchReinstatesSeveralDeals(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const deals = 7
	f := newDLQFixture(t, 8)
	skus := []string{"SKU-BA", "SKU-BB"}
	for _, sku := range skus {
		setStock(t, f.store, sku, 1_000)
	}
	var undealt string
	for i := range deals {
		d, err := f.store.CreateDeal(ctx, domain.Customer{ID: fmt.Sprintf("C-%d", i), Name: "Customer"}, "USD",
			[]domain.Line{{SKU: skus[0], Description: "A", Quantity: 2, UnitPrice: "10.00"},
				{SKU: skus[1], Description: "B", Quantity: int64(1 + i), UnitPrice: "5.00"}}, meta)
		if err != nil {
			t.Fatal(err)
		}
		if d, err = f.store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); err != nil {
			t.Fatal(err)
		}
		req := invoiceRequestOf(d)
		if _, err := f.compensate(ctx, req, "permanent", "unknown customer"); err != nil {
			t.Fatal(err)
		}
		payload, _ := json.Marshal(req)
		now := time.Now()
		dealID := d.ID
		if i == 2 {
			dealID = "" // a poison copy whose deal only its payload names
		}
		res, err := f.store.DeadLetter(ctx, dealID, req.IdempotencyKey,
			postgres.Failure{ErrorClass: domain.ClassExhausted, Reason: "copy", Attempts: 1, FirstFailureAt: now, LastFailureAt: now},
			postgres.DeadLetterSource{MessageUUID: watermill.NewUUID(), Topic: outbox.InvoiceTopic, Handler: "invoice-saga",
				Payload: payload, Metadata: map[string]string{outbox.MetadataIdempotencyKey: req.IdempotencyKey}}, meta)
		if err != nil {
			t.Fatal(err)
		}
		if i == 2 {
			undealt = res.DeadLetterID
		}
	}
	inv0 := map[string]postgres.InventoryView{}
	for _, sku := range skus {
		inv, err := f.store.GetInventory(ctx, sku)
		if err != nil {
			t.Fatal(err)
		}
		inv0[sku] = inv
	}
	op, total, err := f.store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "ERP fixed", carol)
	if err != nil || total != 2*deals {
		t.Fatalf("start: %d %v", total, err)
	}
	p, err := f.store.RunBulkReinject(ctx, op, 0, 0, nil)
	if err != nil || p.Done != total || p.Skipped != 0 {
		t.Fatalf("run: %+v, %v", p, err)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM deals WHERE status <> 'won'`); n != 0 {
		t.Errorf("%d deals not won", n)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE type = $1`, domain.TypeDealReinstated); n != deals {
		t.Errorf("%d deals reinstated, want %d", n, deals)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM dead_letters WHERE state = 'reinjected'`); n != total {
		t.Errorf("%d entries re-injected, want %d", n, total)
	}
	if n := count(t, ctx, f.pool, `SELECT count(*) FROM events WHERE stream_id = $1 AND type = $2`,
		domain.DeadLetterStream(undealt), domain.TypeDeadLetterReinjected); n != 1 {
		t.Errorf("the entry without a deal was re-injected %d times", n)
	}
	want := map[string]int64{skus[0]: 2 * deals, skus[1]: deals * (deals + 1) / 2}
	for _, sku := range skus {
		inv, err := f.store.GetInventory(ctx, sku)
		if err != nil {
			t.Fatal(err)
		}
		if inv.Available != inv0[sku].Available-want[sku] || inv.Allocated != inv0[sku].Allocated+want[sku] {
			t.Errorf("%s: %+v, want %d more allocated than %+v", sku, inv, want[sku], inv0[sku])
		}
		if n := count(t, ctx, f.pool, `SELECT max(stream_version) FROM events WHERE stream_id = $1`, domain.InventoryStream(sku)); n != inv.Version {
			t.Errorf("%s: version %d, its stream is at %d", sku, inv.Version, n)
		}
	}
	if rep, err := postgres.VerifyChain(ctx, f.pool); err != nil || !rep.OK() {
		t.Fatalf("chain: %+v, %v", rep, err)
	}
	if rep, err := projections.Replay(ctx, f.pool, projections.Options{Verify: true}); err != nil || rep.Drift() {
		var b strings.Builder
		rep.Format(&b)
		t.Fatalf("replay: %v\n%s", err, b.String())
	}
}
