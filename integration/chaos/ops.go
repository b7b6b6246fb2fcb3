package chaos

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// rewindRelay moves the relay's offset back by n outbox rows (F11): every
// message after that point is delivered again.
func (r *run) rewindRelay(ctx context.Context, n int) (string, error) {
	tag, err := r.db.Exec(ctx, `UPDATE watermill_offsets_outbox c SET offset_acked = o."offset", last_processed_transaction_id = o.transaction_id
		FROM (SELECT "offset", transaction_id FROM watermill_outbox ORDER BY transaction_id DESC, "offset" DESC
		      OFFSET least($2, (SELECT count(*) / 2 FROM watermill_outbox)) LIMIT 1) o
		WHERE c.consumer_group = $1 AND (o.transaction_id, o."offset") < (c.last_processed_transaction_id, c.offset_acked)`,
		outbox.ConsumerGroup, n)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("rewound %d rows (%d offset row updated)", n, tag.RowsAffected()), nil
}

// injectPoison writes n undecodable invoice requests into the outbox, as a
// buggy producer would (F12), and sends malformed bodies to the API.
func (r *run) injectPoison(ctx context.Context, n int) (string, error) {
	var ids []string
	err := pgx.BeginFunc(ctx, r.db, func(tx pgx.Tx) error {
		for i := range n {
			m := message.NewMessage(watermill.NewUUID(), []byte(fmt.Sprintf(`{"deal_id": "poison-%d", "lines": [`, i)))
			m.Metadata.Set(outbox.MetadataType, outbox.TypeInvoiceRequest)
			m.Metadata.Set(outbox.MetadataSchemaVersion, "1")
			if err := outbox.PublishTx(ctx, tx, outbox.InvoiceTopic, m); err != nil {
				return err
			}
			ids = append(ids, m.UUID)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	codes := r.malformedRequests(ctx)
	r.mu.Lock()
	r.poisonIDs = append(r.poisonIDs, ids...)
	r.malformed = append(r.malformed, codes...)
	r.mu.Unlock()
	return fmt.Sprintf("%d poison messages; malformed bodies answered %v", n, codes), nil
}

// pinXmin holds a transaction with an xid for d (F16).
func (r *run) pinXmin(ctx context.Context, d time.Duration) (string, error) {
	conn, err := r.db.Acquire(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Release()
	tx, err := conn.Begin(ctx)
	if err != nil {
		return "", err
	}
	var xid string
	if err := tx.QueryRow(ctx, `SELECT pg_current_xact_id()::text`).Scan(&xid); err != nil {
		_ = tx.Rollback(ctx)
		return "", err
	}
	sleep(ctx, d)
	if err := tx.Commit(context.WithoutCancel(ctx)); err != nil {
		return "xid " + xid, &lateError{fmt.Errorf("commit failed, the pin ended anyway: %w", err)}
	}
	return "xid " + xid, nil
}

// reinjectRecord is the outcome of one concurrent re-inject of a dead
// letter (F15): of the attempts on one entry exactly one must win.
type reinjectRecord struct {
	DeadLetterID string   `json:"dead_letter_id"`
	DealID       string   `json:"deal_id"`
	Wins         int      `json:"wins"`
	Conflicts    int      `json:"conflicts"`
	Errors       []string `json:"errors,omitempty"`
	At           float64  `json:"at"`
}

// fixAndReinject makes the ERP accept the fixable customers again and then
// re-injects each of their open dead letters twice at once — two
// operators clicking at the same time (F15).
func (r *run) fixAndReinject(ctx context.Context) (string, error) {
	r.mu.Lock()
	if r.fixedAt == 0 {
		r.fixedAt = r.since()
	}
	r.mu.Unlock()
	if err := r.plan.setReject([]string{rejectCustomer}); err != nil {
		return "", err
	}
	if len(r.fixIDs) == 0 {
		return "no fixable customers", nil
	}
	rows, err := r.db.Query(ctx, `SELECT dl.id::text, d.id::text FROM dead_letters dl JOIN deals d ON d.id = dl.deal_id
		WHERE dl.state = 'open' AND d.customer_id = ANY($1)`, r.fixIDs)
	if err != nil {
		return "", err
	}
	type pair struct{ dl, deal string }
	todo, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (pair, error) {
		var p pair
		return p, row.Scan(&p.dl, &p.deal)
	})
	if err != nil {
		return "", err
	}
	var wg sync.WaitGroup
	for _, p := range todo {
		wg.Go(func() {
			rec := reinjectRecord{DeadLetterID: p.dl, DealID: p.deal, At: r.since()}
			var mu sync.Mutex
			var iwg sync.WaitGroup
			gate := make(chan struct{})
			for i := range 2 {
				iwg.Go(func() {
					<-gate
					_, err := r.store.ReinjectDeadLetter(ctx, p.dl, postgres.ReinjectOptions{Reason: "chaos: customer fixed"},
						postgres.Actor{Name: fmt.Sprintf("chaos-operator-%d", i+1), Role: "operator"})
					mu.Lock()
					defer mu.Unlock()
					switch {
					case err == nil:
						rec.Wins++
					case errors.Is(err, domain.ErrStateConflict):
						rec.Conflicts++
					default:
						rec.Errors = append(rec.Errors, err.Error())
					}
				})
			}
			close(gate)
			iwg.Wait()
			// A third operator, from the command line, a moment later:
			// refused, since the entry is no longer open.
			out, err := runOnce(ctx, r.cfg.Bin, []string{"DATABASE_URL=" + r.directURL}, 30*time.Second,
				"dlq", "reinject", p.dl, "--reason", "chaos: double click", "--actor", "chaos-operator-cli")
			switch {
			case err == nil:
				rec.Wins++
			case strings.Contains(out, "conflict") || strings.Contains(out, "cannot re-inject") || strings.Contains(out, "reinjected") ||
				strings.Contains(out, "resolved"):
				rec.Conflicts++
			default:
				rec.Errors = append(rec.Errors, strings.TrimSpace(out))
			}
			r.mu.Lock()
			r.reinjects = append(r.reinjects, rec)
			r.mu.Unlock()
		})
	}
	wg.Wait()
	return fmt.Sprintf("%d dead letters re-injected, 3 operators each", len(todo)), nil
}

// reinjectedDLs are the dead letters the harness re-injected.
func (r *run) reinjectedDLs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, x := range r.reinjects {
		if !slices.Contains(out, x.DeadLetterID) {
			out = append(out, x.DeadLetterID)
		}
	}
	return out
}
