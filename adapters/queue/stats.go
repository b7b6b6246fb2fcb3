package queue

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// TopicStats describes the work queued on one topic at one instant.
type TopicStats struct {
	Topic string
	// Depth is every message of the topic not yet acked.
	Depth int64
	// Available is the messages whose delay has passed and that nobody
	// holds (some may still wait behind an older message of their
	// ordering key).
	Available int64
	// InFlight is the messages held under a live lease.
	InFlight int64
	// Delayed is the messages waiting for a nack delay to pass.
	Delayed int64
	// OldestAvailableAge is how long the longest-waiting available message
	// has been available (0 when none is): the consumer lag.
	OldestAvailableAge time.Duration
	// MaxAttempts is the highest attempt count on the topic.
	MaxAttempts int
}

// Stats returns one TopicStats per topic that has queued messages, ordered
// by topic, measured on the database clock. It is one aggregate query over
// the table, meant for metrics scrapes, not for hot paths.
func Stats(ctx context.Context, pool *pgxpool.Pool) ([]TopicStats, error) {
	rows, err := pool.Query(ctx, `
SELECT topic,
       count(*),
       count(*) FILTER (WHERE available_at <= now() AND (lease_until IS NULL OR lease_until <= now())),
       count(*) FILTER (WHERE lease_until > now()),
       count(*) FILTER (WHERE available_at > now() AND (lease_until IS NULL OR lease_until <= now())),
       COALESCE(EXTRACT(EPOCH FROM now() - min(available_at)
           FILTER (WHERE available_at <= now() AND (lease_until IS NULL OR lease_until <= now()))), 0)::float8,
       max(attempts)
FROM work_queue
GROUP BY topic
ORDER BY topic`)
	if err != nil {
		return nil, fmt.Errorf("queue: cannot read stats: %w", err)
	}
	stats, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (TopicStats, error) {
		var st TopicStats
		var age float64
		err := r.Scan(&st.Topic, &st.Depth, &st.Available, &st.InFlight, &st.Delayed, &age, &st.MaxAttempts)
		st.OldestAvailableAge = time.Duration(age * float64(time.Second))
		return st, err
	})
	if err != nil {
		return nil, fmt.Errorf("queue: cannot read stats: %w", err)
	}
	return stats, nil
}
