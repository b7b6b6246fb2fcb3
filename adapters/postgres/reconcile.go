package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// UnreconciledDeal is a deal that is won (closed, or re-instated by a
// re-inject) and has no invoice recorded yet.
type UnreconciledDeal struct {
	DealID         string        `json:"deal_id"`
	IdempotencyKey string        `json:"idempotency_key"`
	WonAt          time.Time     `json:"won_at"`
	Age            time.Duration `json:"age_ns"`
	// Queued: the deal's invoice request is in the work queue (being
	// handled or waiting for a retry). Not queued means the message is
	// still in the outbox (relay down) or is lost.
	Queued bool `json:"queued"`
}

// unreconciledSQL selects won deals with the time they became won: the
// latest DealWon or DealReinstated of their stream, from the log itself.
const unreconciledSQL = `SELECT d.id::text, d.idempotency_key, w.won_at, (extract(epoch FROM now() - w.won_at) * 1000000)::bigint,
		EXISTS (SELECT 1 FROM work_queue q WHERE q.topic = $3 AND q.ordering_key = d.id::text)
	FROM deals d
	CROSS JOIN LATERAL (SELECT max(e.recorded_at) AS won_at FROM events e
		WHERE e.stream_id = 'deal-' || d.id::text AND e.type IN ('` + domain.TypeDealWon + `', '` + domain.TypeDealReinstated + `')) w
	WHERE d.status = 'won' AND d.idempotency_key IS NOT NULL AND w.won_at <= now() - make_interval(secs => $1)
	ORDER BY w.won_at, d.id
	LIMIT $2`

// UnreconciledDeals returns up to limit deals won at least olderThan ago
// and not invoiced, oldest first.
func (s *Store) UnreconciledDeals(ctx context.Context, olderThan time.Duration, limit int) ([]UnreconciledDeal, error) {
	rows, err := s.pool.Query(ctx, unreconciledSQL, olderThan.Seconds(), limit, outbox.InvoiceTopic)
	if err != nil {
		return nil, fmt.Errorf("cannot list unreconciled deals: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (UnreconciledDeal, error) {
		var u UnreconciledDeal
		var us int64
		err := r.Scan(&u.DealID, &u.IdempotencyKey, &u.WonAt, &us, &u.Queued)
		u.Age = time.Duration(us) * time.Microsecond
		return u, err
	})
	if err != nil {
		return nil, fmt.Errorf("cannot list unreconciled deals: %w", err)
	}
	return out, nil
}

// OldestUnreconciled returns the deal that has been won without an invoice
// the longest, and false when there is none. Its Age is the figure to
// watch: how long a closed deal has gone without an invoice.
func (s *Store) OldestUnreconciled(ctx context.Context) (UnreconciledDeal, bool, error) {
	ds, err := s.UnreconciledDeals(ctx, 0, 1)
	if err != nil || len(ds) == 0 {
		return UnreconciledDeal{}, false, err
	}
	return ds[0], true, nil
}

// AlertState returns the state of alert id and whether it exists.
func (s *Store) AlertState(ctx context.Context, id string) (string, bool, error) {
	var st string
	err := s.pool.QueryRow(ctx, `SELECT state FROM alerts WHERE id=$1`, id).Scan(&st)
	if err == pgx.ErrNoRows {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("cannot read alert %s: %w", id, err)
	}
	return st, true, nil
}
