package postgres_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/postgres"
)

// TestCloseLocksStockInGoOrder: CloseDeal locks a deal's inventory rows in
// one statement, and every other path (compensation, re-inject) locks them
// one by one in Go's sorted SKU order. The two orders must agree whatever
// the column's collation, or a close and a compensation can deadlock. The
// sku column gets an ICU collation that sorts case-insensitively (unlike
// Go's byte order); the control query shows the column's own order differs.
func TestCloseLocksStockInGoOrder(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	skus := []string{"sku-a", "Sku-c", "SKU-B", "sku-d"}
	for _, s := range skus {
		setStock(t, store, s, 10)
	}
	d := createDeal(t, store, lines("sku-a", 1, "Sku-c", 1, "SKU-B", 1, "sku-d", 1))
	if _, err := pool.Exec(ctx, `ALTER TABLE inventory ALTER COLUMN sku TYPE text COLLATE "und-x-icu"`); err != nil {
		t.Fatal(err)
	}
	want := slices.Clone(skus)
	slices.Sort(want) // Go's order, as domain.Deal.Quantities gives it
	if got := d.Lines; len(got) != 4 {
		t.Fatalf("deal has %d lines", len(got))
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	rows, err := tx.Query(ctx, postgres.LockDealStockSQL, d.ID)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
		var sku string
		var avail int64
		var v int
		return sku, r.Scan(&sku, &avail, &v)
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("CloseDeal locks inventory in the order %v, want Go's %v", got, want)
	}
	rows, err = tx.Query(ctx, `SELECT sku FROM inventory ORDER BY sku`)
	if err != nil {
		t.Fatal(err)
	}
	colOrder, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if slices.Equal(colOrder, want) {
		t.Errorf("control: the column's collation orders %v like Go; the test would not catch a collation-dependent lock order", colOrder)
	}
}

// TestCloseStockLockWalksTheIndex: with many SKUs stocked, the close's
// stock lock reads the deal's rows through the primary key, not every
// inventory row (a hash join over the whole table was the first plan of
// the IN (…) form: 350 µs at 1,000 SKUs, growing with the catalogue).
func TestCloseStockLockWalksTheIndex(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	store := postgres.NewStore(pool)
	setStock(t, store, "SKU-A", 10)
	d := createDeal(t, store, lines("SKU-A", 1))
	if _, err := pool.Exec(ctx, `INSERT INTO inventory (sku, available, allocated, version, updated_at)
		SELECT 'BULK-' || i, 10, 0, 1, now() FROM generate_series(1, 5000) AS i`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `ANALYZE inventory`); err != nil {
		t.Fatal(err)
	}
	explain := func(mode string) string {
		conn, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Release()
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(ctx) }()
		name := "lockstock_" + mode
		for _, q := range []string{`SET LOCAL plan_cache_mode = ` + mode, `PREPARE ` + name + `(uuid) AS ` + postgres.LockDealStockSQL} {
			if _, err := tx.Exec(ctx, q); err != nil {
				t.Fatal(err)
			}
		}
		defer func() { _, _ = conn.Exec(ctx, `DEALLOCATE `+name) }()
		// EXECUTE takes no bind parameters: the deal's id (a uuid the
		// store made) is spelled out.
		rows, err := tx.Query(ctx, `EXPLAIN (ANALYZE, COSTS OFF) EXECUTE `+name+`('`+d.ID+`')`)
		if err != nil {
			t.Fatal(err)
		}
		plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(plan, "\n")
	}
	for _, mode := range []string{"force_custom_plan", "force_generic_plan"} {
		if text := explain(mode); !strings.Contains(text, "inventory_pkey") || strings.Contains(text, "Seq Scan on inventory") {
			t.Errorf("%s: the stock lock does not walk inventory's primary key:\n%s", mode, text)
		}
	}
}
