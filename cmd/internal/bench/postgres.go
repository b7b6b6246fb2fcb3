package bench

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgcluster"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/migrations"
)

// server is the one PostgreSQL server of a run.
type server struct {
	adminURL string // a database to CREATE/DROP the run's databases from
	cluster  *pgcluster.Cluster
	settings map[string]string // the private cluster's extra settings
	prefix   string            // of every database this run creates
	template string
	dbs      []string // created, to drop at the end
	admin    *pgxpool.Pool
	pm       int // postmaster pid (0: unknown, e.g. a remote server)
	log      *slog.Logger
}

// clusterSettings are the private cluster's settings beyond PostgreSQL's
// defaults: enough connections for every process of the largest phase.
// Durability settings stay at their defaults (fsync, synchronous_commit on):
// what is measured is what a deployment gets.
var clusterSettings = map[string]string{"max_connections": "300"}

func openServer(ctx context.Context, cfg Config, workDir string) (*server, error) {
	s := &server{log: cfg.Log}
	suffix := make([]byte, 3)
	_, _ = crand.Read(suffix)
	s.prefix = "bench_" + hex.EncodeToString(suffix)
	s.adminURL = cfg.DatabaseURL
	if s.adminURL == "" {
		settings := maps.Clone(clusterSettings)
		maps.Copy(settings, cfg.PGSettings)
		c, err := pgcluster.Start(ctx, pgcluster.Config{DataDir: filepath.Join(workDir, "postgres"), Settings: settings,
			Logger: cfg.Log})
		if err != nil {
			return nil, fmt.Errorf("bench: embedded postgres (or pass --database-url): %w", err)
		}
		s.cluster, s.settings = c, settings
		s.adminURL = c.URL("postgres")
	}
	if u, err := url.Parse(s.adminURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		s.close(ctx)
		return nil, errors.New("bench: --database-url must be a postgres:// URL (each phase connects to a database of its own on that server)")
	}
	admin, err := pgxpool.New(ctx, s.adminURL)
	if err != nil {
		s.close(ctx)
		return nil, fmt.Errorf("bench: connect: %w", err)
	}
	s.admin = admin
	if err := admin.Ping(ctx); err != nil {
		s.close(ctx)
		return nil, fmt.Errorf("bench: connect: %w", err)
	}
	// The postmaster is the parent of our backend, when the server runs on
	// this machine (its /proc entry is then readable).
	var backend int
	if err := admin.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&backend); err == nil {
		if st, err := readStat(backend); err == nil {
			s.pm = st.ppid
		}
	}
	return s, nil
}

// url returns the URL of database name on the server.
func (s *server) url(name string) string {
	u, err := url.Parse(s.adminURL) // checked by openServer
	if err != nil {
		return s.adminURL
	}
	u.Path = "/" + name
	return u.String()
}

func (s *server) createDatabase(ctx context.Context, name, template string) error {
	q := "CREATE DATABASE " + pgx.Identifier{name}.Sanitize()
	if template != "" {
		q += " TEMPLATE " + pgx.Identifier{template}.Sanitize()
	}
	if _, err := s.admin.Exec(ctx, q); err != nil {
		return fmt.Errorf("cannot create database %s (does the role have CREATEDB?): %w", name, err)
	}
	s.dbs = append(s.dbs, name)
	return nil
}

func (s *server) dropDatabase(ctx context.Context, name string) error {
	if _, err := s.admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("cannot drop database %s: %w", name, err)
	}
	for i, d := range s.dbs {
		if d == name {
			s.dbs = append(s.dbs[:i], s.dbs[i+1:]...)
			break
		}
	}
	return nil
}

func (s *server) close(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if s.admin != nil {
		for _, d := range append([]string(nil), s.dbs...) {
			if err := s.dropDatabase(ctx, d); err != nil {
				s.log.Warn("bench: cleanup", "err", err)
			}
		}
		s.admin.Close()
	}
	if s.cluster != nil {
		if err := s.cluster.Stop(ctx, pgcluster.StopFast); err != nil {
			s.log.Warn("bench: stop postgres", "err", err)
		}
	}
}

// cpu is the CPU time the server's processes have used: the postmaster and
// its children (live ones from their /proc entries, exited ones through the
// postmaster's cutime/cstime). ok is false when the server is not local.
func (s *server) cpu() (time.Duration, bool) {
	if s.pm == 0 {
		return 0, false
	}
	pm, err := readStat(s.pm)
	if err != nil {
		return 0, false
	}
	total := pm.self + pm.children
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, false
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil || st.ppid != s.pm {
			continue
		}
		total += st.self + st.children
	}
	return total, true
}

// stat is what the bench reads of /proc/<pid>/stat.
type stat struct {
	ppid     int
	self     time.Duration // utime + stime
	children time.Duration // cutime + cstime: reaped children
}

// clockTick is USER_HZ, 100 on every Linux the bench runs on.
const clockTick = 10 * time.Millisecond

func readStat(pid int) (stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return stat{}, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 > len(s) {
		return stat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	// After the command: state, ppid, …; utime, stime, cutime, cstime are
	// the 14th-17th fields of the line, f[11]-f[14] here.
	f := strings.Fields(s[i+2:])
	if len(f) < 15 {
		return stat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	n := func(k int) int64 { v, _ := strconv.ParseInt(f[k], 10, 64); return v }
	return stat{ppid: int(n(1)), self: time.Duration(n(11)+n(12)) * clockTick, children: time.Duration(n(13)+n(14)) * clockTick}, nil
}

// newPool connects to database name as application appName.
func (s *server) newPool(ctx context.Context, name, appName string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(s.url(name))
	if err != nil {
		return nil, fmt.Errorf("bench: database URL: %w", err)
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = appName
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("bench: connect to %s: %w", name, err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("bench: connect to %s: %w", name, err)
	}
	return pool, nil
}

var benchMeta = domain.Metadata{Actor: "bench", CorrelationID: "bench"}

// prepareTemplate makes the template every phase database is copied from:
// dealbridge's and River's migrations, cfg.SKUs stocked SKUs and
// cfg.PoolDeals open deals, vacuumed and analysed.
func (h *harness) prepareTemplate(ctx context.Context) error {
	s := h.srv
	s.template = s.prefix + "_template"
	if err := s.createDatabase(ctx, s.template, ""); err != nil {
		return err
	}
	pool, err := s.newPool(ctx, s.template, "dealbridge-bench-setup", 16)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := migrations.Up(ctx, pool); err != nil {
		return fmt.Errorf("bench: migrate: %w", err)
	}
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("bench: river migrator: %w", err)
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("bench: river migrations: %w", err)
	}
	store := postgres.NewStore(pool)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i := range h.cfg.SKUs {
		g.Go(func() error {
			_, err := store.SetInventory(gctx, skuName(i), 1_000_000_000, benchMeta)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return fmt.Errorf("bench: stock: %w", err)
	}
	if err := createDeals(ctx, store, h.cfg.PoolDeals, h.cfg.SKUs, 1, h.log); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, `VACUUM ANALYZE`); err != nil {
		return fmt.Errorf("bench: vacuum template: %w", err)
	}
	return nil
}

func skuName(i int) string { return fmt.Sprintf("SKU-%04d", i) }

// createDeals opens n deals of 1-3 lines spread over skus SKUs, through
// Store.CreateDeal, 8 at a time.
func createDeals(ctx context.Context, store *postgres.Store, n, skus int, seed uint64, log *slog.Logger) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	start := time.Now()
	for i := range n {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		var lines []domain.Line
		for range 1 + rng.IntN(3) {
			lines = append(lines, domain.Line{SKU: skuName(rng.IntN(skus)), Description: "Widget",
				Quantity: int64(1 + rng.IntN(5)), UnitPrice: fmt.Sprintf("%d.%02d", 1+rng.IntN(900), rng.IntN(100))})
		}
		cust := domain.Customer{ID: fmt.Sprintf("C-%d", rng.IntN(5000)), Name: "Customer"}
		g.Go(func() error {
			_, err := store.CreateDeal(gctx, cust, "EUR", lines, benchMeta)
			return err
		})
		if i > 0 && i%10_000 == 0 {
			log.Info("bench: creating deals", "done", i, "of", n, "per_s", int(float64(i)/time.Since(start).Seconds()))
		}
	}
	if err := g.Wait(); err != nil {
		return fmt.Errorf("bench: create deals: %w", err)
	}
	return nil
}

// newPhaseDB copies the template into a database of its own.
func (h *harness) newPhaseDB(ctx context.Context, tag string) (string, error) {
	h.seq++
	name := fmt.Sprintf("%s_p%02d_%s", h.srv.prefix, h.seq, tag)
	return name, h.srv.createDatabase(ctx, name, h.srv.template)
}
