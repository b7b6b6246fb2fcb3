package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// openDeals lists the phase database's open deals (the template's pool).
func openDeals(ctx context.Context, pool *pgxpool.Pool) ([]string, error) {
	rows, err := pool.Query(ctx, `SELECT id::text FROM deals WHERE status = 'open' ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("bench: list open deals: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("bench: list open deals: %w", err)
	}
	return ids, nil
}

// loadOut is what a load generator did.
type loadOut struct {
	start, end time.Time
	closed     []string        // deals whose close returned success
	closeLat   []time.Duration // client-side CloseDeal time (the transaction plus its read-back)
	errors     int
	firstErr   error
	exhausted  bool // the pool of open deals ran out before the time was up
	behind     bool // the open-loop generator could not keep its schedule
}

// closer closes deals won through store and keeps the tally.
type closer struct {
	store *postgres.Store
	mu    sync.Mutex
	out   loadOut
	ok    atomic.Int64 // successful closes so far
}

func (c *closer) close(ctx context.Context, id string) {
	t := time.Now()
	_, err := c.store.CloseDeal(ctx, id, domain.OutcomeWon, nil, benchMeta)
	d := time.Since(t)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		if ctx.Err() != nil {
			return // the phase is over; not an error of the contender
		}
		c.out.errors++
		if c.out.firstErr == nil {
			c.out.firstErr = err
		}
		return
	}
	c.ok.Add(1)
	c.out.closed = append(c.out.closed, id)
	c.out.closeLat = append(c.out.closeLat, d)
}

// closedLoop closes ids with clients concurrent clients, as fast as they
// can, for d or until ids run out. When backlog is set, a client waits
// while backlog() is at least maxBacklog: at maximum rate the pipeline
// then runs at its own pace, with input equal to output.
func closedLoop(ctx context.Context, store *postgres.Store, ids []string, clients int, d time.Duration,
	backlog func(closed int64) int64, maxBacklog int64) loadOut {
	c := &closer{store: store}
	var next atomic.Int64
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.out.start = time.Now()
	deadline := c.out.start.Add(d)
	var exhausted atomic.Bool
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for time.Now().Before(deadline) && ctx.Err() == nil {
				if backlog != nil && backlog(c.ok.Load()) >= maxBacklog {
					time.Sleep(2 * time.Millisecond)
					continue
				}
				i := next.Add(1) - 1
				if int(i) >= len(ids) {
					exhausted.Store(true)
					return
				}
				c.close(ctx, ids[i])
			}
		})
	}
	wg.Wait()
	c.out.end = time.Now()
	c.out.exhausted = exhausted.Load()
	return c.out
}

// openLoop closes ids at rate per second on a fixed schedule, whatever the
// closes' own speed (open loop: a slow close does not slow the arrivals),
// for d or until ids run out. At most 512 closes are in flight; past that
// the generator falls behind its schedule, and says so.
func openLoop(ctx context.Context, store *postgres.Store, ids []string, rate float64, d time.Duration) loadOut {
	c := &closer{store: store}
	sem := make(chan struct{}, 512)
	var wg sync.WaitGroup
	c.out.start = time.Now()
	issued, late := 0, 0
	for {
		el := time.Since(c.out.start)
		if el >= d {
			break
		}
		if issued >= len(ids) {
			c.out.exhausted = true
			break
		}
		due := min(int(el.Seconds()*rate)+1, len(ids))
		if due-issued > int(rate/10)+1 {
			late++ // more than 100ms behind schedule
		}
		for ; issued < due; issued++ {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				wg.Wait()
				c.out.end = time.Now()
				return c.out
			}
			id := ids[issued]
			wg.Go(func() {
				defer func() { <-sem }()
				c.close(ctx, id)
			})
		}
		time.Sleep(time.Millisecond)
	}
	wg.Wait()
	c.out.end = time.Now()
	c.out.behind = late > 0 || float64(issued) < 0.98*rate*d.Seconds() && !c.out.exhausted
	return c.out
}
