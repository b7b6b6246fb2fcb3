package chaos

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/outbox"
)

// Sample is one point of the timeline. DB and ERP fields are -1 when the
// source did not answer (a Postgres crash, an ERP restart).
type Sample struct {
	T           float64 `json:"t"`
	Acked       int     `json:"acked"`        // closes acknowledged so far (generator)
	Invoiced    int     `json:"invoiced"`     // deals invoiced (DB)
	Reverted    int     `json:"reverted"`     // deals compensated (DB)
	Queue       int     `json:"queue"`        // work_queue rows
	DLQOpen     int     `json:"dlq_open"`     // open dead letters
	Unrelayed   int     `json:"unrelayed"`    // outbox rows the relay has not passed
	LagSeconds  float64 `json:"lag_seconds"`  // age of the oldest unrelayed row
	ERPAttempts int     `json:"erp_attempts"` // POST /invoices so far
	ERPCreates  int     `json:"erp_creates"`
}

// unrelayed counts the outbox rows the active relay has not passed and the
// age of the oldest: for the real relay by its (xid8, offset) cursor (the
// relay-lag metric's own measure), for the naive one by its last id.
func (r *run) unrelayed(ctx context.Context) (int, float64, error) {
	var n int
	var age *float64
	var err error
	if r.naive == nil {
		b, err := outbox.MeasureBacklog(ctx, r.db)
		return int(b.Messages), b.OldestAge.Seconds(), err
	}
	err = r.db.QueryRow(ctx, `SELECT count(*), extract(epoch FROM localtimestamp - min(created_at))::float8
		FROM watermill_outbox WHERE "offset" > $1`, r.naive.lastID.Load()).Scan(&n, &age)
	if age == nil {
		return n, 0, err
	}
	return n, max(0, *age), err
}

func (r *run) erpStats() (erpsim.Stats, error) {
	var s erpsim.Stats
	resp, err := r.http.Get(r.erpURL + "/_sim/stats")
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, err
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

func (r *run) acked() int {
	n := 0
	for _, op := range r.hist.all() {
		if op.Type == "ok" && (op.F == "close-won" || op.F == "close-lost") {
			n++
		}
	}
	return n
}

func (r *run) sampleOnce(ctx context.Context) Sample {
	s := Sample{T: r.since(), Acked: r.acked(), Invoiced: -1, Reverted: -1, Queue: -1, DLQOpen: -1, Unrelayed: -1, LagSeconds: -1,
		ERPAttempts: -1, ERPCreates: -1}
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := r.db.QueryRow(qctx, `SELECT
		(SELECT count(*) FROM deals WHERE status = 'invoiced'),
		(SELECT count(*) FROM deals WHERE status = 'reverted'),
		(SELECT count(*) FROM work_queue),
		(SELECT count(*) FROM dead_letters WHERE state = 'open')`).Scan(&s.Invoiced, &s.Reverted, &s.Queue, &s.DLQOpen); err != nil {
		s.Invoiced, s.Reverted, s.Queue, s.DLQOpen = -1, -1, -1, -1
	}
	if n, age, err := r.unrelayed(qctx); err == nil {
		s.Unrelayed, s.LagSeconds = n, age
	}
	if st, err := r.erpStats(); err == nil {
		s.ERPAttempts, s.ERPCreates = st.Attempts, st.Creates
	}
	return s
}

func (r *run) sample(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		s := r.sampleOnce(ctx)
		r.mu.Lock()
		r.samples = append(r.samples, s)
		r.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// drain waits until every saga has ended, the work queue is empty and the
// relay has passed every outbox row; or until nothing has moved for
// cfg.Quiet with nothing queued (whatever is left then will never move);
// or until cfg.Drain.
func (r *run) drain(ctx context.Context) {
	deadline := time.Now().Add(r.cfg.Drain)
	var lastKey [3]int
	lastMove := time.Now()
	defer func() {
		r.mu.Lock()
		r.drainEnd = r.since()
		r.mu.Unlock()
	}()
	for ctx.Err() == nil {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var open, queued, terminal int
		err := r.db.QueryRow(qctx, `SELECT
			(SELECT count(*) FROM invoice_sagas WHERE state NOT IN ('invoiced', 'compensated')),
			(SELECT count(*) FROM work_queue),
			(SELECT count(*) FROM invoice_sagas WHERE state IN ('invoiced', 'compensated'))`).Scan(&open, &queued, &terminal)
		unrelayed, _, uerr := r.unrelayed(qctx)
		cancel()
		if err == nil && uerr == nil {
			if open == 0 && queued == 0 && unrelayed == 0 {
				return
			}
			attempts := -1
			if st, err := r.erpStats(); err == nil {
				attempts = st.Attempts
			}
			key := [3]int{terminal, attempts, queued + unrelayed}
			if key != lastKey {
				lastKey, lastMove = key, time.Now()
			} else if queued == 0 && unrelayed == 0 && time.Since(lastMove) > r.cfg.Quiet {
				r.logf("drain: quiet for %v with %d saga(s) open and nothing queued", r.cfg.Quiet, open)
				return
			}
		}
		if time.Now().After(deadline) {
			r.mu.Lock()
			r.drainTimed = true
			r.mu.Unlock()
			return
		}
		sleep(ctx, 250*time.Millisecond)
	}
}
