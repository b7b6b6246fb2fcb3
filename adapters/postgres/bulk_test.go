package postgres_test

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
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
