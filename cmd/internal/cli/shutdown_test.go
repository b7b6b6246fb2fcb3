package cli_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/app"
)

// TestRunHandlerReleasesConnections: once RunHandler has returned and its
// pool is closed, nothing of it is left connected to the database — in
// particular not the work queue's LISTEN connection, which lives until its
// subscriber is closed (and `dev`, which runs the handler in-process, stops
// its embedded Postgres right after).
func TestRunHandlerReleasesConnections(t *testing.T) {
	dbURL := pgtest.NewDatabase(t)
	admin, err := pgxpool.New(t.Context(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(admin.Close)
	const appName = "handler-shutdown-test"
	count := func(extra string) int {
		t.Helper()
		var n int
		if err := admin.QueryRow(t.Context(),
			`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`+extra, appName).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	waitCount := func(what, extra string, ok func(int) bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for n := count(extra); !ok(n); n = count(extra) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: still %d connections after 20s", what, n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	pool, err := app.NewPool(t.Context(), dbURL, appName, 4)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- app.RunHandler(ctx, pool, app.HandlerConfig{ERPURL: "http://127.0.0.1:1"}, slog.New(slog.DiscardHandler))
	}()
	waitCount("LISTEN connection", ` AND query LIKE 'LISTEN%'`, func(n int) bool { return n >= 1 })

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("RunHandler: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("RunHandler still running 20s after its context was cancelled")
	}
	pool.Close()
	waitCount("after RunHandler returned and its pool closed", "", func(n int) bool { return n == 0 })
}
