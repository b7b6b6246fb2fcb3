package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// The River contender: the same saga, with River as the queue. The close
// transaction (postgres.Store.CloseDeal with a River InvoicePublisher) does
// the same deal, inventory and event writes and inserts a River job with
// InsertTx instead of the outbox message; a River worker calls the same ERP
// (adapters/erp's HTTP client, the same idempotency key K) and records the
// invoice (postgres.Store.RecordInvoiceTx) and completes the job
// (river.JobCompleteTx) in one transaction. A failed ERP call returns the
// error and River retries the job with its own backoff; there is no
// compensation path: the benchmark's ERP never fails.

// riverAppName is the River worker's application_name.
const riverAppName = "dealbridge-bench-river"

// invoiceArgs is the River job: the invoice request of one close.
type invoiceArgs struct {
	Req domain.InvoiceRequest `json:"req"`
}

// Kind implements river.JobArgs.
func (invoiceArgs) Kind() string { return "dealbridge_invoice" }

// riverPublisher inserts the invoice job in the close transaction.
func riverPublisher(client *river.Client[pgx.Tx]) postgres.InvoicePublisher {
	return func(ctx context.Context, tx pgx.Tx, req domain.InvoiceRequest, _ domain.Metadata) error {
		if _, err := client.InsertTx(ctx, tx, invoiceArgs{Req: req}, nil); err != nil {
			return fmt.Errorf("cannot insert river job: %w", err)
		}
		return nil
	}
}

// newRiverInserter is an insert-only River client over pool.
func newRiverInserter(pool *pgxpool.Pool) (*river.Client[pgx.Tx], error) {
	c, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return nil, fmt.Errorf("river client: %w", err)
	}
	return c, nil
}

type invoiceWorker struct {
	river.WorkerDefaults[invoiceArgs]
	pool  *pgxpool.Pool
	store *postgres.Store
	port  erp.Port
}

// Work creates the invoice in the ERP with no transaction open, then
// records it and completes the job in one transaction.
func (w *invoiceWorker) Work(ctx context.Context, job *river.Job[invoiceArgs]) error {
	req := job.Args.Req
	inv, err := w.port.CreateInvoice(ctx, toERP(req))
	if err != nil {
		return fmt.Errorf("deal %s: %w", req.DealID, err)
	}
	if inv.Number == "" {
		return fmt.Errorf("deal %s: the ERP returned an invoice without a number", req.DealID)
	}
	tx, err := w.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("cannot begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	meta := domain.Metadata{Actor: "river-worker", CorrelationID: req.DealID}
	if _, err := w.store.RecordInvoiceTx(ctx, tx, req.DealID, req.IdempotencyKey, inv.Number, meta); err != nil {
		return err
	}
	if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
		return fmt.Errorf("cannot complete job %d: %w", job.ID, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("cannot commit: %w", err)
	}
	return nil
}

func toERP(r domain.InvoiceRequest) erp.InvoiceRequest {
	lines := make([]erp.Line, len(r.Lines))
	for i, l := range r.Lines {
		lines[i] = erp.Line{SKU: l.SKU, Description: l.Description, Quantity: l.Quantity, UnitPrice: l.UnitPrice}
	}
	return erp.InvoiceRequest{Key: r.IdempotencyKey, Reference: r.DealID, CustomerID: r.Customer.ID, CustomerName: r.Customer.Name,
		Currency: r.Currency, Lines: lines, Total: r.Total}
}

// RiverWorkerConfig configures RunRiverWorker.
type RiverWorkerConfig struct {
	DatabaseURL string
	ERPURL      string
	// Workers is River's MaxWorkers on the default queue (default 8).
	Workers int
	// FetchCooldown and FetchPollInterval are River's (zero: River's
	// defaults).
	FetchCooldown, FetchPollInterval time.Duration
	// ERPTimeout bounds one ERP call (default 10s).
	ERPTimeout time.Duration
	Logger     *slog.Logger
}

// RunRiverWorker runs the River contender's worker until ctx is done (the
// `dealbridge bench river-worker` child process), then stops River
// gracefully.
func RunRiverWorker(ctx context.Context, cfg RiverWorkerConfig) error {
	if cfg.DatabaseURL == "" || cfg.ERPURL == "" {
		return errors.New("river-worker: --database-url and --erp-url are required")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 8
	}
	if cfg.ERPTimeout <= 0 {
		cfg.ERPTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	pcfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("river-worker: database URL: %w", err)
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = riverAppName
	pcfg.MaxConns = int32(cfg.Workers + 4) // as the handler: consumers + 4
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("river-worker: connect: %w", err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("river-worker: connect: %w", err)
	}
	workers := river.NewWorkers()
	river.AddWorker(workers, &invoiceWorker{pool: pool, store: postgres.NewStore(pool),
		port: erp.NewHTTPClient(erp.HTTPConfig{BaseURL: cfg.ERPURL, Timeout: cfg.ERPTimeout})})
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
		Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: cfg.Workers}},
		Workers:           workers,
		Logger:            cfg.Logger,
		FetchCooldown:     cfg.FetchCooldown,
		FetchPollInterval: cfg.FetchPollInterval,
	})
	if err != nil {
		return fmt.Errorf("river-worker: client: %w", err)
	}
	if err := client.Start(ctx); err != nil {
		return fmt.Errorf("river-worker: start: %w", err)
	}
	cfg.Logger.Info("river worker running", "workers", cfg.Workers, "erp", cfg.ERPURL)
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	if err := client.Stop(sctx); err != nil {
		return fmt.Errorf("river-worker: stop: %w", err)
	}
	return nil
}
