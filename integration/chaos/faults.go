package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/dealbridge/dealbridge/adapters/crashpoint"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgcluster"
)

// Kind is a kind of injected fault.
type Kind string

// The fault kinds, by the row of the fault matrix (reliability.md §2) they
// exercise.
const (
	RelayKill       Kind = "relay-kill"             // F1: SIGKILL relay at a random time
	RelayCrashpoint Kind = "relay-crashpoint"       // F1: relay_after_publish_before_offset_ack
	HandlerCrash2xx Kind = "handler-crashpoint-2xx" // F2: after_erp_2xx_before_commit
	HandlerCrashAck Kind = "handler-crashpoint-ack" // F2: after_commit_before_ack
	HandlerKill     Kind = "handler-kill"           // F2: SIGKILL a handler at a random time
	APIKill         Kind = "api-kill"               // F4: SIGKILL the API (webhook answers lost)
	ERPKill         Kind = "erp-kill"               // F9: SIGKILL the ERP (durable store)
	PGCrash         Kind = "pg-crash"               // F3: pg_ctl stop -m immediate, restart
	PGTerminate     Kind = "pg-terminate"           // F4: pg_terminate_backend(dealbridge-*)
	ERP5xx          Kind = "erp-5xx"                // F5
	ERPDown         Kind = "erp-down"               // F5: 503 + Retry-After for a while
	ERP429          Kind = "erp-429"                // F6
	ERP4xx          Kind = "erp-4xx"                // F7: rejected customers (per deal)
	ERPHang         Kind = "erp-hang"               // F8
	ERPLostResponse Kind = "erp-lost-response"      // F9
	PGLatency       Kind = "pg-latency"             // F10 (toxiproxy)
	PGPartition     Kind = "pg-partition"           // F10 (toxiproxy)
	ERPLatency      Kind = "erp-latency"            // F10 (toxiproxy; beyond the ERP timeout)
	ERPPartition    Kind = "erp-partition"          // F10 (toxiproxy black hole)
	Redeliver       Kind = "redeliver"              // F11: relay offset rewound
	DupWebhook      Kind = "dup-webhook"            // F11: close re-sent (per deal)
	Poison          Kind = "poison"                 // F12: poison outbox message + malformed bodies
	DoubleClose     Kind = "double-close"           // F14: two concurrent closes (per deal)
	DoubleReinject  Kind = "double-reinject"        // F15
	XminPin         Kind = "xmin-pin"               // F16
	SlowCommit      Kind = "slow-commit"            // F17: producers sleeping before COMMIT (per deal)
	KillListener    Kind = "kill-listener"          // F18: LISTEN connections terminated
)

type kindInfo struct {
	kind       Kind
	f          string
	what       string
	perDeal    bool // injected through the deal plan, not the schedule
	relay      bool // needs the real relay process
	minD, maxD time.Duration
}

var kindTable = []kindInfo{
	{RelayKill, "F1", "SIGKILL of the relay at a random time", false, true, 0, 0},
	{RelayCrashpoint, "F1", "relay SIGKILLs itself after publishing a batch, before its offset commits", false, true, 0, 0},
	{HandlerCrash2xx, "F2", "handler SIGKILLs itself after the ERP answered 2xx, before the local commit", false, false, 0, 0},
	{HandlerCrashAck, "F2", "handler SIGKILLs itself after the local commit, before the work-queue ack", false, false, 0, 0},
	{HandlerKill, "F2", "SIGKILL of a handler at a random time", false, false, 0, 0},
	{APIKill, "F4", "SIGKILL of the API process (responses to the CRM lost)", false, false, 0, 0},
	{ERPKill, "F9", "SIGKILL of the ERP simulator (durable store), restarted", false, false, 0, 0},
	{PGCrash, "F3", "Postgres immediate shutdown, restart after a pause", false, false, time.Second, 3 * time.Second},
	{PGTerminate, "F4", "pg_terminate_backend on every dealbridge-* connection", false, false, 0, 0},
	{ERP5xx, "F5", "ERP answers 500/503 to 30% of creates", false, false, 4 * time.Second, 10 * time.Second},
	{ERPDown, "F5", "ERP down: 503 + Retry-After to everything", false, false, 2 * time.Second, 5 * time.Second},
	{ERP429, "F6", "ERP answers 429 + Retry-After: 1 to 30% of creates", false, false, 4 * time.Second, 10 * time.Second},
	{ERP4xx, "F7", "ERP rejects the customer with 422 (permanent)", true, false, 0, 0},
	{ERPHang, "F8", "ERP holds 20% of creates until the client times out", false, false, 3 * time.Second, 8 * time.Second},
	{ERPLostResponse, "F9", "ERP commits 30% of creates and drops the response", false, false, 4 * time.Second, 10 * time.Second},
	{PGLatency, "F10", "toxiproxy: 150 ms ± 50 ms latency to Postgres", false, false, 3 * time.Second, 8 * time.Second},
	{PGPartition, "F10", "toxiproxy: Postgres proxy down (connections cut, refused)", false, false, time.Second, 4 * time.Second},
	{ERPLatency, "F10", "toxiproxy: 1.5 s latency to the ERP (beyond the 1 s client timeout)", false, false, 2 * time.Second, 5 * time.Second},
	{ERPPartition, "F10", "toxiproxy: ERP black hole (timeout toxic, both directions)", false, false, 2 * time.Second, 5 * time.Second},
	{Redeliver, "F11", "relay offset rewound by 20-200 rows (duplicate delivery)", false, true, 0, 0},
	{DupWebhook, "F11", "the CRM re-sends an acknowledged close", true, false, 0, 0},
	{Poison, "F12", "poison message in the outbox + malformed request bodies", false, false, 0, 0},
	{DoubleClose, "F14", "two concurrent closes of one deal (won+won or won+lost)", true, false, 0, 0},
	{DoubleReinject, "F15", "the same dead letter re-injected twice concurrently (after the ERP accepts the customer again)", false, false, 0, 0},
	{XminPin, "F16", "a transaction holding an xid (pins the xmin horizon)", false, false, 4 * time.Second, 12 * time.Second},
	{SlowCommit, "F17", "producers sleeping 0-300 ms before COMMIT (out-of-order commits)", true, false, 0, 0},
	{KillListener, "F18", "the handlers' LISTEN connections terminated", false, false, 0, 0},
}

func infoOf(k Kind) kindInfo {
	for _, ki := range kindTable {
		if ki.kind == k {
			return ki
		}
	}
	return kindInfo{kind: k, f: "?"}
}

// AllKinds returns every fault kind.
func AllKinds() []Kind {
	out := make([]Kind, len(kindTable))
	for i, k := range kindTable {
		out[i] = k.kind
	}
	return out
}

// Fault is one scheduled fault: at At after the load starts, for For (0: an
// instant fault); Param is kind-specific (a crash point's hit count, a
// process index, rows to rewind).
type Fault struct {
	Kind  Kind          `json:"kind"`
	At    time.Duration `json:"at"`
	For   time.Duration `json:"for,omitempty"`
	Param int           `json:"param,omitempty"`
}

// schedule draws the fault schedule: every enabled kind at least once, one
// more per every ~40 s of load, at uniformly random times within the load.
func schedule(rng *rand.Rand, kinds []Kind, load time.Duration, handlers int) []Fault {
	var out []Fault
	for _, k := range kinds {
		ki := infoOf(k)
		if ki.perDeal {
			continue
		}
		n := 1 + int(load/(40*time.Second))
		if k == DoubleReinject {
			n = 1 // one fix + re-inject pass during the load; another after it
		}
		for range n {
			f := Fault{Kind: k, At: time.Duration(float64(load) * (0.05 + 0.8*rng.Float64()))}
			if k == DoubleReinject {
				f.At = time.Duration(float64(load) * 0.7)
			}
			if ki.maxD > 0 {
				f.For = ki.minD + time.Duration(rng.Float64()*float64(ki.maxD-ki.minD))
				f.For = f.For.Round(100 * time.Millisecond)
			}
			switch k {
			case RelayCrashpoint:
				f.Param = 1 + rng.IntN(30)
			case HandlerCrash2xx, HandlerCrashAck:
				f.Param = 1 + rng.IntN(10)
			case Redeliver:
				f.Param = 20 + rng.IntN(181)
			case Poison:
				f.Param = 1 + rng.IntN(3)
			}
			if k == HandlerKill || k == HandlerCrash2xx || k == HandlerCrashAck {
				f.Param = f.Param*16 + rng.IntN(handlers) // low 4 bits: which handler
			}
			f.At = f.At.Round(100 * time.Millisecond)
			out = append(out, f)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].At < out[j].At })
	return out
}

// Window is a fault as it was applied: seconds since the run started.
type Window struct {
	Kind  Kind    `json:"kind"`
	Start float64 `json:"start"`
	End   float64 `json:"end"`
	Note  string  `json:"note,omitempty"`
	Err   string  `json:"error,omitempty"`
}

// erpPlan composes the ERP simulator's fault plan from the windows that are
// active, and applies it (PUT /_sim/faults) whenever it changes and after
// every restart of the simulator.
type erpPlan struct {
	url    string // the simulator's own address, not through toxiproxy
	client *http.Client

	mu       sync.Mutex
	active   map[Kind]int
	reject   []string
	downTill time.Time
}

func (p *erpPlan) faults() erpsim.Faults {
	f := erpsim.Faults{RetryAfterSeconds: 1, RejectCustomers: slices.Clone(p.reject)}
	if p.active[ERP5xx] > 0 {
		f.ErrorRate = 0.3
	}
	if p.active[ERP429] > 0 {
		f.RateLimitRate = 0.3
	}
	if p.active[ERPHang] > 0 {
		f.HangRate = 0.2
	}
	if p.active[ERPLostResponse] > 0 {
		f.DropAfterCommitRate = 0.3
	}
	if p.active[ERPDown] > 0 {
		f.DownUntil = p.downTill
	}
	return f
}

func (p *erpPlan) set(k Kind, on bool, down time.Time) error {
	p.mu.Lock()
	if on {
		p.active[k]++
		if k == ERPDown {
			p.downTill = down
		}
	} else {
		p.active[k]--
	}
	p.mu.Unlock()
	return p.apply()
}

func (p *erpPlan) setReject(ids []string) error {
	p.mu.Lock()
	p.reject = slices.Clone(ids)
	p.mu.Unlock()
	return p.apply()
}

func (p *erpPlan) apply() error {
	p.mu.Lock()
	f := p.faults()
	p.mu.Unlock()
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	var last error
	for range 50 {
		req, _ := http.NewRequest(http.MethodPut, p.url+"/_sim/faults", bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		resp, err := p.client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				return nil
			}
			err = fmt.Errorf("PUT /_sim/faults: %s", resp.Status)
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return last
}

// inject runs one fault and returns a note; windows end when it returns.
func (r *run) inject(ctx context.Context, f Fault) (string, error) {
	switch f.Kind {
	case RelayKill:
		r.procs["relay"].kill("")
		return "", nil
	case RelayCrashpoint:
		r.procs["relay"].kill(fmt.Sprintf("%s@%d", crashpoint.RelayAfterPublishBeforeOffsetAck, f.Param))
		r.arm(crashpoint.RelayAfterPublishBeforeOffsetAck)
		return fmt.Sprintf("armed @%d", f.Param), nil
	case HandlerCrash2xx, HandlerCrashAck:
		point := crashpoint.AfterERP2xxBeforeCommit
		if f.Kind == HandlerCrashAck {
			point = crashpoint.AfterCommitBeforeAck
		}
		h := r.handler(f.Param % 16)
		h.kill(fmt.Sprintf("%s@%d", point, f.Param/16))
		r.arm(point)
		return fmt.Sprintf("%s armed @%d", h.name, f.Param/16), nil
	case HandlerKill:
		h := r.handler(f.Param % 16)
		h.kill("")
		return h.name, nil
	case APIKill:
		r.procs["api"].kill("")
		return "", nil
	case ERPKill:
		r.procs["erp-sim"].kill("")
		return "", nil
	case PGCrash:
		r.pgMu.Lock()
		defer r.pgMu.Unlock()
		if err := r.cluster.Stop(ctx, pgcluster.StopImmediate); err != nil {
			return "", err
		}
		sleep(ctx, f.For)
		return "", r.cluster.Restart(context.WithoutCancel(ctx))
	case PGTerminate, KillListener:
		q := `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'dealbridge-%' AND pid <> pg_backend_pid()`
		if f.Kind == KillListener {
			q = `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'dealbridge-handler' AND query ILIKE 'listen%'`
		}
		var n int
		err := r.db.QueryRow(ctx, q).Scan(&n)
		return fmt.Sprintf("%d backends", n), err
	case ERP5xx, ERP429, ERPHang, ERPLostResponse, ERPDown:
		// The plan is the harness's; a simulator that is down (erp-kill)
		// gets it when it comes back (proc.onStart), so a failed PUT is
		// late, not lost.
		var late error
		if err := r.plan.set(f.Kind, true, time.Now().Add(f.For)); err != nil {
			late = &lateError{fmt.Errorf("applied on the simulator's restart: %w", err)}
		}
		sleep(ctx, f.For)
		if err := r.plan.set(f.Kind, false, time.Time{}); err != nil && late == nil {
			late = &lateError{fmt.Errorf("cleared on the simulator's restart: %w", err)}
		}
		return "", late
	case PGLatency, ERPLatency:
		p, lat, jit := r.pgProxy, 150, 50
		if f.Kind == ERPLatency {
			p, lat, jit = r.erpProxy, 1500, 0
		}
		name := fmt.Sprintf("lat%d", r.seq.Add(1))
		if _, err := p.Toxics.AddToxicJson(strings.NewReader(fmt.Sprintf(
			`{"name":%q,"type":"latency","stream":"downstream","attributes":{"latency":%d,"jitter":%d}}`, name, lat, jit))); err != nil {
			return "", err
		}
		sleep(ctx, f.For)
		return "", p.Toxics.RemoveToxic(context.Background(), name)
	case PGPartition:
		r.pgMu.Lock()
		defer r.pgMu.Unlock()
		r.pgProxy.Stop()
		sleep(ctx, f.For)
		return "", r.pgProxy.Start()
	case ERPPartition:
		n := r.seq.Add(1)
		for _, s := range []string{"upstream", "downstream"} {
			if _, err := r.erpProxy.Toxics.AddToxicJson(strings.NewReader(fmt.Sprintf(
				`{"name":"bh%d%s","type":"timeout","stream":%q,"attributes":{"timeout":0}}`, n, s, s))); err != nil {
				return "", err
			}
		}
		sleep(ctx, f.For)
		e1 := r.erpProxy.Toxics.RemoveToxic(context.Background(), fmt.Sprintf("bh%dupstream", n))
		e2 := r.erpProxy.Toxics.RemoveToxic(context.Background(), fmt.Sprintf("bh%ddownstream", n))
		if e1 != nil {
			return "", e1
		}
		return "", e2
	case Redeliver:
		return r.rewindRelay(ctx, f.Param)
	case Poison:
		return r.injectPoison(ctx, f.Param)
	case DoubleReinject:
		return r.fixAndReinject(ctx)
	case XminPin:
		return r.pinXmin(ctx, f.For)
	}
	return "", fmt.Errorf("unknown fault kind %q", f.Kind)
}

var dbFault = map[Kind]bool{PGTerminate: true, KillListener: true, XminPin: true, Poison: true, Redeliver: true, DoubleReinject: true}

// lateError reports a fault that was applied but did not end cleanly
// (e.g. the pinning transaction was killed by a Postgres crash).
type lateError struct{ err error }

func (e *lateError) Error() string { return e.err.Error() }

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// nemesis runs the schedule; it returns when every fault has ended.
func (r *run) nemesis(ctx context.Context, sched []Fault) {
	var wg sync.WaitGroup
	for _, f := range sched {
		wg.Go(func() {
			sleep(ctx, time.Until(r.loadStart.Add(f.At)))
			if ctx.Err() != nil {
				return
			}
			start := r.since()
			note, err := r.inject(ctx, f)
			// Faults the harness applies through Postgres wait out a
			// Postgres outage caused by another fault.
			for try := 0; err != nil && dbFault[f.Kind] && try < 40 && ctx.Err() == nil; try++ {
				sleep(ctx, 500*time.Millisecond)
				note, err = r.inject(ctx, f)
			}
			w := Window{Kind: f.Kind, Start: start, End: r.since(), Note: note}
			var late *lateError
			if errors.As(err, &late) {
				// The fault was in force; only its clean end failed.
				w.Note += " (" + err.Error() + ")"
				err = nil
			}
			if err != nil {
				w.Err = err.Error()
				r.logf("chaos: fault %s at %.1fs: %v", f.Kind, start, err)
			}
			r.mu.Lock()
			r.windows = append(r.windows, w)
			r.mu.Unlock()
		})
	}
	wg.Wait()
}
