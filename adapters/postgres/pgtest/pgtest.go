// Package pgtest provides PostgreSQL databases for tests: a fresh, fully
// migrated database per test, created from a migrated template.
//
// The server is TEST_DATABASE_URL when set (an admin URL whose role may
// CREATE DATABASE); otherwise one private cluster per test binary, started
// on first use from the local PostgreSQL binaries (or, without them, a
// testcontainers container when a Docker engine answers) and stopped by
// Main. A package using NewDatabase or NewPool therefore needs
//
//	func TestMain(m *testing.M) { pgtest.Main(m) }
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgcluster"
	"github.com/dealbridge/dealbridge/migrations"
)

// EnvURL names the environment variable holding an admin URL of an
// existing server to create test databases on.
const EnvURL = "TEST_DATABASE_URL"

const (
	setupTimeout = 3 * time.Minute
	opTimeout    = time.Minute
)

// sharedSettings make the shared throwaway cluster fast; they give up
// durability across an operating system crash, which tests never need.
var sharedSettings = map[string]string{
	"max_connections":    "600",
	"fsync":              "off",
	"synchronous_commit": "off",
	"full_page_writes":   "off",
}

// server is the shared server of this test binary: the one piece of global
// mutable state, started lazily by the first test that needs it.
var server struct {
	mu       sync.Mutex
	mainUsed bool
	started  bool
	err      error
	srv      pgcluster.Server // nil when EnvURL is used
	dir      string           // DataDir of the private cluster
	adminURL string
	admin    *pgxpool.Pool
	template string
}

// Main runs the package's tests and then stops the private cluster if one
// was started. Use: func TestMain(m *testing.M) { pgtest.Main(m) }
func Main(m *testing.M) {
	server.mu.Lock()
	server.mainUsed = true
	server.mu.Unlock()
	code := m.Run()
	if err := shutdown(); err != nil {
		fmt.Fprintln(os.Stderr, "pgtest:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// NewDatabase creates a fresh database with every migration applied and
// returns its URL. The database is dropped (WITH (FORCE)) at test cleanup.
func NewDatabase(t testing.TB) string {
	t.Helper()
	adminURL, admin, template, err := shared()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	name, err := databaseName(t.Name())
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), opTimeout)
	defer cancel()
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+ident(name)+" TEMPLATE "+ident(template)); err != nil {
		t.Fatalf("pgtest: create database %s from template %s: %v", name, template, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+ident(name)+" WITH (FORCE)"); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	u, err := withDatabase(adminURL, name)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return u
}

// NewPool is NewDatabase plus a pool on the new database, closed at
// cleanup (before the database is dropped).
func NewPool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	u := NewDatabase(t)
	return newPool(t, u)
}

// NewCluster starts a private cluster owned by the calling test alone, with
// a migrated database "dealbridge" inside, and returns it with that
// database's URL. Crash tests may Stop it (StopImmediate) and Restart it. It
// is stopped and removed at cleanup. It needs the local PostgreSQL server
// binaries; it keeps synchronous_commit on, so that every acknowledged
// commit survives an immediate stop.
func NewCluster(t testing.TB) (*pgcluster.Cluster, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), setupTimeout)
	defer cancel()
	dir, err := makeDataDir()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("pgtest: %v", err)
		}
	})
	c, err := pgcluster.Start(ctx, pgcluster.Config{
		DataDir:  dir,
		Settings: map[string]string{"fsync": "off", "full_page_writes": "off"},
		Logger:   quietLogger(),
	})
	if err != nil {
		t.Fatalf("pgtest: NewCluster needs the PostgreSQL server binaries: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		if err := c.Stop(ctx, pgcluster.StopImmediate); err != nil {
			t.Errorf("pgtest: %v", err)
		}
	})
	const db = "dealbridge"
	if err := c.EnsureDatabase(ctx, db); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	if err := migrate(ctx, c.URL(db)); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return c, c.URL(db)
}

func newPool(t testing.TB, u string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), u)
	if err != nil {
		t.Fatalf("pgtest: open pool: %v", err)
	}
	t.Cleanup(pool.Close)
	ctx, cancel := context.WithTimeout(t.Context(), opTimeout)
	defer cancel()
	if err := pool.Ping(ctx); err != nil {
		t.Fatalf("pgtest: connect to test database: %v", err)
	}
	return pool
}

// shared returns the shared server, starting it and migrating its template
// on first use.
func shared() (adminURL string, admin *pgxpool.Pool, template string, err error) {
	server.mu.Lock()
	defer server.mu.Unlock()
	if !server.started {
		server.started = true
		server.err = setup()
	}
	return server.adminURL, server.admin, server.template, server.err
}

// setup runs with server.mu held.
func setup() error {
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	adminURL := os.Getenv(EnvURL)
	if adminURL == "" {
		if !server.mainUsed {
			return errors.New("no " + EnvURL + " and no TestMain stopping the private cluster: " +
				"add func TestMain(m *testing.M) { pgtest.Main(m) } to the package's tests")
		}
		dir, err := makeDataDir()
		if err != nil {
			return err
		}
		server.dir = dir
		srv, err := pgcluster.Open(ctx, pgcluster.Config{DataDir: dir, Settings: sharedSettings, Logger: quietLogger()})
		if err != nil {
			return fmt.Errorf("no %s set and cannot start a private PostgreSQL: %w", EnvURL, err)
		}
		server.srv = srv
		adminURL = srv.URL("postgres")
	} else if !strings.HasPrefix(adminURL, "postgres://") && !strings.HasPrefix(adminURL, "postgresql://") {
		return fmt.Errorf("%s must be a postgres:// URL", EnvURL)
	}
	server.adminURL = adminURL

	cfg, err := pgxpool.ParseConfig(adminURL)
	if err != nil {
		return fmt.Errorf("parse admin URL: %w", err)
	}
	cfg.MaxConns = 8
	admin, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return fmt.Errorf("open admin pool: %w", err)
	}
	server.admin = admin

	template, err := databaseName("template")
	if err != nil {
		return err
	}
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+ident(template)); err != nil {
		return fmt.Errorf("create template database (the %s role needs CREATEDB): %w", EnvURL, err)
	}
	server.template = template
	u, err := withDatabase(adminURL, template)
	if err != nil {
		return err
	}
	return migrate(ctx, u)
}

// shutdown drops the template (on an external server) or stops the private
// server.
func shutdown() error {
	server.mu.Lock()
	defer server.mu.Unlock()
	if !server.started {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	var errs []error
	if server.admin != nil {
		if server.srv == nil && server.template != "" {
			if _, err := server.admin.Exec(ctx, "DROP DATABASE IF EXISTS "+ident(server.template)+" WITH (FORCE)"); err != nil {
				errs = append(errs, fmt.Errorf("drop template database: %w", err))
			}
		}
		server.admin.Close()
	}
	if server.srv != nil {
		if err := server.srv.Close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stop private cluster: %w", err))
		}
	}
	if server.dir != "" {
		if err := os.RemoveAll(server.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// migrate applies every migration to the database at u.
func migrate(ctx context.Context, u string) error {
	pool, err := pgxpool.New(ctx, u)
	if err != nil {
		return fmt.Errorf("open pool to migrate: %w", err)
	}
	defer pool.Close()
	if err := migrations.Up(ctx, pool); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return nil
}

// makeDataDir makes a directory for a private cluster that the server user
// can traverse when running as root (os.MkdirTemp makes it 0700).
func makeDataDir() (string, error) {
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return "", fmt.Errorf("create cluster directory: %w", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cluster directory: %w", err)
	}
	return dir, nil
}

// databaseName makes a unique database name (also across test binaries
// sharing one server) that hints at the test.
func databaseName(hint string) (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("random database name: %w", err)
	}
	var sb strings.Builder
	sb.WriteString("pgtest_")
	for _, r := range strings.ToLower(hint) {
		if sb.Len() >= 40 {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			sb.WriteRune(r)
		default:
			sb.WriteByte('_')
		}
	}
	sb.WriteByte('_')
	sb.WriteString(hex.EncodeToString(b[:]))
	return sb.String(), nil
}

// withDatabase returns adminURL pointing at database name instead.
func withDatabase(adminURL, name string) (string, error) {
	u, err := url.Parse(adminURL)
	if err != nil {
		return "", fmt.Errorf("parse admin URL: %w", err)
	}
	u.Path = "/" + name
	u.RawPath = ""
	return u.String(), nil
}

func ident(name string) string { return pgx.Identifier{name}.Sanitize() }

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}
