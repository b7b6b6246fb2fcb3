package cli_test

import (
	"context"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
)

// auditDB is a database with a little history: two invoiced deals and one
// won deal without an invoice.
func auditDB(t *testing.T) (*pgxpool.Pool, map[string]string, []string) {
	t.Helper()
	u := pgtest.NewDatabase(t)
	pool, err := pgxpool.New(t.Context(), u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	store := postgres.NewStore(pool)
	ctx := t.Context()
	meta := domain.Metadata{Actor: "cli-test"}
	if _, err := store.SetInventory(ctx, "SKU-1", 10, meta); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := range 3 {
		d, err := store.CreateDeal(ctx, domain.Customer{ID: "C-1", Name: "Globex"}, "USD",
			[]domain.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 1, UnitPrice: "5.00"}}, meta)
		if err != nil {
			t.Fatal(err)
		}
		if d, err = store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); err != nil {
			t.Fatal(err)
		}
		if i < 2 {
			if _, err := store.RecordInvoice(ctx, d.ID, *d.IdempotencyKey, "INV-"+d.ID[:6], meta); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, d.ID)
	}
	return pool, map[string]string{"DATABASE_URL": u}, ids
}

func TestReplayCommand(t *testing.T) {
	pool, env, ids := auditDB(t)
	code, out, errOut := run(t, env, "replay", "--verify")
	if code != 0 || !strings.Contains(out, "verified: the live projections equal") {
		t.Fatalf("replay --verify on a clean database: exit %d\n%s%s", code, out, errOut)
	}
	if _, err := pool.Exec(t.Context(), `UPDATE deals SET total='0.01' WHERE id=$1`, ids[0]); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = run(t, env, "replay", "--verify")
	if code != 1 || !strings.Contains(out, "changed id="+ids[0]) || !strings.Contains(out, `total: live "0.01", rebuilt "5.00"`) ||
		!strings.Contains(errOut, "drift") {
		t.Fatalf("replay --verify after tampering: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = run(t, env, "replay", "--swap")
	if code != 0 || !strings.Contains(out, "swapped") {
		t.Fatalf("replay --swap: exit %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut = run(t, env, "replay", "--verify", "--json"); code != 0 || !strings.Contains(out, `"verified": true`) {
		t.Fatalf("replay --verify after the swap: exit %d\n%s%s", code, out, errOut)
	}
	if code, _, _ := run(t, env, "replay", "--writers", "0"); code != 2 {
		t.Fatalf("--writers 0: exit %d, want 2", code)
	}
}

func TestAuditVerifyCommand(t *testing.T) {
	pool, env, ids := auditDB(t)
	code, out, errOut := run(t, env, "audit", "verify")
	if code != 0 || !strings.Contains(out, "ok: every stream's hash chain is intact") {
		t.Fatalf("audit verify on a clean log: exit %d\n%s%s", code, out, errOut)
	}
	digest := regexp.MustCompile(`head digest ([0-9a-f]{64})`).FindStringSubmatch(out)
	if digest == nil {
		t.Fatalf("no head digest in %q", out)
	}
	if code, _, _ := run(t, env, "audit", "verify", "--expect-digest", digest[1]); code != 0 {
		t.Fatalf("--expect-digest with the same digest: exit %d", code)
	}

	// A superuser edits an invoice number in the log.
	ctx := t.Context()
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	var pos int64
	for _, q := range []string{
		`ALTER TABLE events DISABLE TRIGGER events_no_update_delete`,
		`UPDATE events SET payload = jsonb_set(payload, '{invoice_number}', '"INV-FORGED"') WHERE stream_id = $1 AND type = 'InvoiceCreated' RETURNING position`,
		`ALTER TABLE events ENABLE TRIGGER events_no_update_delete`,
	} {
		if strings.HasPrefix(q, "UPDATE") {
			if err := tx.QueryRow(ctx, q, domain.DealStream(ids[1])).Scan(&pos); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if _, err := tx.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	code, out, errOut = run(t, env, "audit", "verify")
	want := "BAD " + domain.DealStream(ids[1]) + " version 3 (position "
	if code != 1 || !strings.Contains(out, want) || !strings.Contains(out, "InvoiceCreated): edited") || !strings.Contains(errOut, "hash chain is broken") {
		t.Fatalf("audit verify after an edit: exit %d, want 1 and %q\n%s%s", code, want, out, errOut)
	}
	if strings.Count(out, "BAD ") != 1 {
		t.Fatalf("one edit, several reports:\n%s", out)
	}
	if code, _, _ := run(t, env, "audit"); code != 2 {
		t.Fatalf("audit without a subcommand: exit %d, want 2", code)
	}
	if code, _, _ := run(t, env, "audit", "nonsense"); code != 2 {
		t.Fatalf("audit nonsense: exit %d, want 2", code)
	}
}

func TestReconcileCommand(t *testing.T) {
	_, env, ids := auditDB(t)
	sim, err := erpsim.New(erpsim.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	ts := httptest.NewServer(sim.Handler())
	defer ts.Close()
	env["DEALBRIDGE_ERP_URL"] = ts.URL

	code, out, errOut := run(t, env, "reconcile", "--after", "1h")
	if code != 0 || !strings.Contains(out, "checked 0 won deal(s)") || !strings.Contains(out, "oldest unreconciled deal: "+ids[2]) {
		t.Fatalf("reconcile --after 1h: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = run(t, env, "reconcile", "--after", "1ms")
	if code != 0 || !strings.Contains(out, ids[2]) || !strings.Contains(out, "alerted") || !strings.Contains(out, "1 alert(s) raised") {
		t.Fatalf("reconcile --after 1ms: exit %d\n%s%s", code, out, errOut)
	}
	code, out, _ = run(t, env, "reconcile", "--after", "1ms")
	if code != 0 || !strings.Contains(out, "already_alerted") || !strings.Contains(out, "0 alert(s) raised") {
		t.Fatalf("second reconcile: exit %d\n%s", code, out)
	}
}
