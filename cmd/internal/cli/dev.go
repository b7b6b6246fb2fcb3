package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgcluster"
	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/migrations"
)

func runDev(ctx context.Context, env Env, args []string) error {
	var (
		c         common
		listen    string
		simListen string
		dataDir   string
		r         relayFlags
		h         handlerFlags
		sim       erpsim.Config
		noSeed    bool
		chaos     bool
		mc        bool
	)
	f := newFlags(env, "dev", "dev [flags]")
	c.register(f)
	f.string(&listen, "listen", "DEALBRIDGE_LISTEN", "127.0.0.1:8080", "address of the HTTP API")
	f.string(&simListen, "erp-sim-listen", "DEALBRIDGE_ERP_SIM_LISTEN", "127.0.0.1:8081", "address of the simulated ERP")
	f.string(&dataDir, "data-dir", "DEALBRIDGE_DATA_DIR", ".dealbridge", "where the embedded Postgres and the ERP simulator keep their data")
	f.BoolVar(&mc, "maker-checker", true, "money edits of dead letters need a second operator's approval")
	f.BoolVar(&noSeed, "no-seed", false, "do not seed demo data into an empty database")
	f.BoolVar(&chaos, "chaos", false, "turn on an ERP fault plan (5xx, 429, lost responses, hangs; customer C-REJECT always rejected) to watch retries, compensation and dead letters")
	r.register(f)
	h.register(f, false)
	var hf httpFlags
	hf.register(f)
	var mf metricsFlags
	mf.register(f, "serve GET /metrics on this separate address, without credentials, instead of on --listen (empty: on --listen)")
	sim.RegisterFlags(f.FlagSet)
	if err := f.parse(args); err != nil {
		return err
	}
	if err := r.validate(); err != nil {
		return err
	}
	logger, err := c.logger(env)
	if err != nil {
		return err
	}
	if chaos {
		// A fault plan a newcomer can watch: retries, a lost response
		// resolved by lookup, and a customer the ERP always rejects.
		sim.Faults.ErrorRate = max(sim.Faults.ErrorRate, 0.3)
		sim.Faults.RateLimitRate = max(sim.Faults.RateLimitRate, 0.1)
		sim.Faults.DropAfterCommitRate = max(sim.Faults.DropAfterCommitRate, 0.1)
		sim.Faults.HangRate = max(sim.Faults.HangRate, 0.02)
		sim.Faults.RejectCustomers = append(sim.Faults.RejectCustomers, "C-REJECT")
		if h.erpTimeout > 3*time.Second {
			h.erpTimeout = 3 * time.Second
		}
	}
	dataDir, err = filepath.Abs(dataDir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return fmt.Errorf("cannot create data dir: %w", err)
	}
	// Bind both ports before starting anything, so that a port in use is
	// one clear error rather than a half-started system.
	apiLn, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s (--listen): %w", listen, err)
	}
	defer apiLn.Close()
	simLn, err := net.Listen("tcp", simListen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s (--erp-sim-listen): %w", simListen, err)
	}
	defer simLn.Close()
	metricsLn, err := mf.bind()
	if err != nil {
		return err
	}
	if metricsLn != nil {
		defer metricsLn.Close()
	}

	dbURL := c.databaseURL
	if dbURL == "" {
		srv, err := pgcluster.Open(ctx, pgcluster.Config{DataDir: filepath.Join(dataDir, "postgres"), Logger: logger})
		if err != nil {
			return err
		}
		defer func() {
			if err := srv.Close(context.WithoutCancel(ctx)); err != nil {
				logger.Error("embedded postgres did not stop cleanly", "err", err)
			}
		}()
		if err := srv.EnsureDatabase(ctx, "dealbridge"); err != nil {
			return err
		}
		dbURL = srv.URL("dealbridge")
	}
	pool, err := app.NewPool(ctx, dbURL, "dealbridge-dev", 40)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := migrations.Up(ctx, pool); err != nil {
		return err
	}
	if err := postgres.NewStore(pool).SetMakerChecker(ctx, mc); err != nil {
		return err
	}
	if !noSeed {
		if err := seed(ctx, pool, logger); err != nil {
			return err
		}
	}
	if sim.StorePath == "" {
		sim.StorePath = filepath.Join(dataDir, "erp-sim.jsonl")
	}
	sim.Logger = logger
	simSrv, err := erpsim.New(sim)
	if err != nil {
		return err
	}
	defer simSrv.Close()

	apiURL := "http://" + apiLn.Addr().String()
	h.erpURL = "http://" + simLn.Addr().String()
	hcfg, err := h.config(env)
	if err != nil {
		return err
	}
	httpCfg, crmOpen, err := hf.config(env, apiLn.Addr())
	if err != nil {
		return err
	}
	// One registry for everything this process runs: the pipeline gauges,
	// the handler's ERP and router metrics.
	reg, err := app.NewMetricsRegistry(pool, logger)
	if err != nil {
		return err
	}
	hcfg.Metrics = reg
	metricsURL := apiURL + "/metrics"
	if metricsLn != nil {
		metricsURL = "http://" + metricsLn.Addr().String() + "/metrics"
	} else {
		metricsOnAPI(&httpCfg, reg, apiLn.Addr(), logger)
	}
	// The handler runs in this process: its breaker's state is knowable.
	port, closePort, err := app.ERPPort(hcfg, logger)
	if err != nil {
		return err
	}
	defer closePort()
	if b, ok := port.(*erp.Breaker); ok {
		httpCfg.BreakerState = func() (string, bool) { return b.State(), true }
	}
	httpHandler, err := app.HTTPHandler(ctx, pool, logger, httpCfg)
	if err != nil {
		return err
	}
	adminPassword, err := bootstrapAdmin(ctx, pool)
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, `dealbridge dev is running (Ctrl-C stops it)
  API:          %s/api/v1/deals
  ERP simulator: %s/invoices
  DATABASE_URL=%s
  data dir:     %s

Try:
  curl -s -X PUT %[1]s/api/v1/inventory/SKU-1 -d '{"available":100}'
  curl -s -X POST %[1]s/api/v1/deals -d '{"customer":{"id":"C-1","name":"Globex"},"currency":"USD","lines":[{"sku":"SKU-1","description":"Widget","quantity":2,"unit_price":"495.00"}]}'
  curl -s -X POST %[1]s/api/v1/deals/ID/close -d '{"outcome":"won"}'
  curl -s %[2]s/invoices
`, apiURL, h.erpURL, dbURL, dataDir)

	fmt.Fprintf(env.Stdout, "\nDashboard:     %s/\n", apiURL)
	fmt.Fprintf(env.Stdout, "Metrics:       %s\n", metricsURL)
	if adminPassword != "" {
		fmt.Fprintf(env.Stdout, "  first admin:  user admin, password %s (shown once; change users with 'dealbridge users')\n", adminPassword)
	} else {
		fmt.Fprintln(env.Stdout, "  log in with an existing user ('dealbridge users list'; 'dealbridge users reset-password NAME --actor YOU' if you lost it)")
	}
	if crmOpen {
		fmt.Fprintln(env.Stdout, "  the CRM API runs WITHOUT a token (loopback dev); set DEALBRIDGE_API_TOKEN to require one")
	} else {
		fmt.Fprintln(env.Stdout, "  the CRM API requires the bearer token from DEALBRIDGE_API_TOKEN")
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return app.Serve(gctx, apiLn, httpHandler, logger) })
	g.Go(func() error { return app.Serve(gctx, simLn, simSrv.Handler(), logger) })
	if metricsLn != nil {
		g.Go(func() error { return app.ServeMetrics(gctx, metricsLn, reg, logger) })
	}
	g.Go(func() error {
		return app.RunRelay(gctx, pool, r.config(), logger)
	})
	g.Go(func() error { return app.RunHandlerWithPort(gctx, pool, port, hcfg, logger) })
	err = g.Wait()
	if ctx.Err() != nil && (err == nil || errors.Is(err, context.Canceled)) {
		fmt.Fprintln(env.Stdout, "dealbridge dev stopped")
		return nil
	}
	return err
}

// seed puts a little demo data into an empty database: stock for three
// SKUs and one open deal. It does nothing once inventory exists, so a
// second run keeps the first run's data untouched.
func seed(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) error {
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM inventory`).Scan(&n); err != nil {
		return fmt.Errorf("cannot check for demo data: %w", err)
	}
	if n > 0 {
		return nil
	}
	store := postgres.NewStore(pool)
	meta := domain.Metadata{Actor: "dev-seed"}
	for _, sku := range []string{"SKU-1", "SKU-2", "SKU-3"} {
		if _, err := store.SetInventory(ctx, sku, 100, meta); err != nil {
			return fmt.Errorf("seed: %w", err)
		}
	}
	d, err := store.CreateDeal(ctx, domain.Customer{ID: "C-1", Name: "Globex"}, "USD",
		[]domain.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 2, UnitPrice: "495.00"}}, meta)
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	logger.Info("seeded demo data", "skus", 3, "open_deal", d.ID)
	return nil
}
