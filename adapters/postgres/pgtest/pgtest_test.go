package pgtest_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgcluster"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestDatabasesAreMigratedAndIsolated(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	a, b := pgtest.NewPool(t), pgtest.NewPool(t)

	for _, pool := range []interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}{a, b} {
		var migrated bool
		if err := pool.QueryRow(ctx, "SELECT to_regclass('watermill_outbox') IS NOT NULL").Scan(&migrated); err != nil || !migrated {
			t.Fatalf("outbox table present = %v, %v; want migrations applied", migrated, err)
		}
	}
	if _, err := a.Exec(ctx, "CREATE TABLE only_in_a (v int)"); err != nil {
		t.Fatal(err)
	}
	var inB bool
	if err := b.QueryRow(ctx, "SELECT to_regclass('only_in_a') IS NOT NULL").Scan(&inB); err != nil || inB {
		t.Fatalf("table created in a visible in b = %v, %v", inB, err)
	}
	var nameA, nameB string
	if err := a.QueryRow(ctx, "SELECT current_database()").Scan(&nameA); err != nil {
		t.Fatal(err)
	}
	if err := b.QueryRow(ctx, "SELECT current_database()").Scan(&nameB); err != nil {
		t.Fatal(err)
	}
	if nameA == nameB {
		t.Fatalf("both pools on database %s", nameA)
	}
}

func TestParallel(t *testing.T) {
	t.Parallel()
	for i := range 8 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			pool := pgtest.NewPool(t)
			if _, err := pool.Exec(ctx, "CREATE TABLE n (v int)"); err != nil {
				t.Fatal(err)
			}
			if _, err := pool.Exec(ctx, "INSERT INTO n VALUES ($1)", i); err != nil {
				t.Fatal(err)
			}
			var sum int
			if err := pool.QueryRow(ctx, "SELECT sum(v) FROM n").Scan(&sum); err != nil || sum != i {
				t.Fatalf("sum = %d, %v; want %d", sum, err, i)
			}
		})
	}
}

func TestNewDatabaseURL(t *testing.T) {
	t.Parallel()
	u := pgtest.NewDatabase(t)
	conn, err := pgx.Connect(t.Context(), u)
	if err != nil {
		t.Fatalf("connect %s: %v", u, err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(t.Context(), "SELECT count(*) FROM watermill_outbox").Scan(&n); err != nil || n != 0 {
		t.Fatalf("outbox rows = %d, %v", n, err)
	}
}

func TestNewClusterSurvivesImmediateStop(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c, u := pgtest.NewCluster(t)
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')"); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)
	if err := c.Stop(ctx, pgcluster.StopImmediate); err != nil {
		t.Fatal(err)
	}
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err = pgx.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var v string
	if err := conn.QueryRow(ctx, "SELECT v FROM kept").Scan(&v); err != nil || v != "x" {
		t.Fatalf("after immediate stop and restart: v = %q, %v", v, err)
	}
}
