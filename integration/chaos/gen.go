package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/domain"
)

// rejectCustomer is always rejected by the ERP (F7: permanent).
const rejectCustomer = "C-REJECT"

var skus = []string{"SKU-1", "SKU-2", "SKU-3", "SKU-4", "SKU-5", "SKU-6", "SKU-7", "SKU-8"}

// dealPlan is what the generator will do with one deal, drawn from the
// seed before the run starts.
type dealPlan struct {
	Idx      int           `json:"idx"`
	At       time.Duration `json:"at"`
	Customer string        `json:"customer"`
	Lines    []planLine    `json:"lines"`
	Slow     bool          `json:"slow,omitempty"`   // F17: closed by a slow producer
	Double   string        `json:"double,omitempty"` // F14: "won" or "lost": a second, concurrent close
	Dup      bool          `json:"dup,omitempty"`    // F11: the close is re-sent after its ack
	Fix      bool          `json:"fix,omitempty"`    // F15: customer rejected until the fix
}

type planLine struct {
	SKU      string `json:"sku"`
	Quantity int64  `json:"quantity"`
	Price    string `json:"unit_price"`
}

func planDeals(rng *rand.Rand, c *Config) []dealPlan {
	out := make([]dealPlan, c.Deals)
	nFix := 0
	if c.enabled(DoubleReinject) {
		nFix = max(3, c.Deals/200)
	}
	for i := range out {
		p := dealPlan{Idx: i, Customer: fmt.Sprintf("C-%d", rng.IntN(1000))}
		// Arrivals spread evenly over 95% of the load, jittered.
		p.At = time.Duration((float64(i) + rng.Float64()) / float64(c.Deals) * 0.95 * float64(c.Load))
		for range 1 + rng.IntN(2) {
			p.Lines = append(p.Lines, planLine{SKU: skus[rng.IntN(len(skus))], Quantity: 1 + rng.Int64N(5),
				Price: fmt.Sprintf("%d.%02d", 1+rng.IntN(900), rng.IntN(100))})
		}
		if c.enabled(ERP4xx) && rng.Float64() < 0.03 {
			p.Customer = rejectCustomer
		}
		if c.enabled(SlowCommit) && rng.Float64() < c.SlowFraction {
			p.Slow = true
		}
		if c.enabled(DoubleClose) && rng.Float64() < 0.03 {
			p.Double = "won"
			if rng.Float64() < 0.3 {
				p.Double = "lost"
			}
		}
		if c.enabled(DupWebhook) && rng.Float64() < 0.03 {
			p.Dup = true
		}
		out[i] = p
	}
	// Fixable customers: among the first 40% of the deals, so that they
	// are dead-lettered before the fix at 70% of the load.
	for k := range nFix {
		i := rng.IntN(max(1, c.Deals*2/5))
		out[i].Customer = fmt.Sprintf("C-FIX-%d", k)
		out[i].Fix = true
	}
	return out
}

// Op is one operation of the generator's history, Jepsen style: Type is
// "ok" (definitely happened), "fail" (definitely did not) or "info" (the
// outcome is unknown: a timeout, a reset, a 5xx).
type Op struct {
	Deal     int     `json:"deal"`
	DealID   string  `json:"deal_id,omitempty"`
	F        string  `json:"f"` // create, close-won, close-lost, dup-close
	Via      string  `json:"via"`
	Invoke   float64 `json:"invoke"`
	Complete float64 `json:"complete"`
	Type     string  `json:"type"`
	Status   int     `json:"status,omitempty"`
	Err      string  `json:"error,omitempty"`
}

type history struct {
	mu  sync.Mutex
	ops []Op
}

func (h *history) add(op Op) {
	h.mu.Lock()
	h.ops = append(h.ops, op)
	h.mu.Unlock()
}

func (h *history) all() []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Op(nil), h.ops...)
}

// slowCommit is the F17 producer hook: a random sleep between the last
// write and COMMIT, so that commits land out of sequence order.
func slowCommit(ctx context.Context, _ pgx.Tx) error {
	select {
	case <-time.After(time.Duration(rand.IntN(300)) * time.Millisecond):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *run) setInventory(ctx context.Context, sku string) error {
	var last error
	for range 50 {
		st, _, err := r.call(ctx, http.MethodPut, "/api/v1/inventory/"+sku, `{"available":1000000000}`)
		if err == nil && st == http.StatusOK {
			return nil
		}
		last = fmt.Errorf("PUT inventory %s: status %d, %v", sku, st, err)
		time.Sleep(100 * time.Millisecond)
	}
	return last
}

// call sends one request to the API. err != nil means no response.
func (r *run) call(ctx context.Context, method, path, body string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, r.apiURL+path, strings.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := r.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, err
	}
	return resp.StatusCode, b, nil
}

// refused reports whether err means the request was never sent (connection
// refused): a definite failure, not an ambiguous one.
func refused(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// generate drives every deal of the plan, each at its planned time.
func (r *run) generate(ctx context.Context) {
	work := make(chan dealPlan)
	var wg sync.WaitGroup
	for range r.cfg.Concurrency {
		wg.Go(func() {
			for p := range work {
				r.drive(ctx, p)
			}
		})
	}
	for _, p := range r.plans {
		sleep(ctx, time.Until(r.loadStart.Add(p.At)))
		if ctx.Err() != nil {
			break
		}
		work <- p
	}
	close(work)
	wg.Wait()
}

func (r *run) drive(ctx context.Context, p dealPlan) {
	id, ok := r.create(ctx, p)
	if !ok {
		return
	}
	if p.Double != "" {
		var wg sync.WaitGroup
		wg.Go(func() { r.close(ctx, p, id, "won", "api") })
		wg.Go(func() { r.close(ctx, p, id, p.Double, "api") })
		wg.Wait()
		return
	}
	via := "api"
	if p.Slow {
		via = "slow"
	}
	if r.close(ctx, p, id, "won", via) && p.Dup {
		time.Sleep(300 * time.Millisecond)
		r.closeOnce(ctx, p, id, "won", "api", "dup-close")
	}
}

func (r *run) create(ctx context.Context, p dealPlan) (string, bool) {
	lines := make([]map[string]any, len(p.Lines))
	for i, l := range p.Lines {
		lines[i] = map[string]any{"sku": l.SKU, "description": "Widget " + l.SKU, "quantity": l.Quantity, "unit_price": l.Price}
	}
	body, _ := json.Marshal(map[string]any{"customer": map[string]string{"id": p.Customer, "name": "Customer " + p.Customer},
		"currency": "USD", "lines": lines})
	for try := range 20 {
		op := Op{Deal: p.Idx, F: "create", Via: "api", Invoke: r.since()}
		st, b, err := r.call(ctx, http.MethodPost, "/api/v1/deals", string(body))
		op.Complete, op.Status = r.since(), st
		var out struct {
			ID string `json:"id"`
		}
		switch {
		case err == nil && st == http.StatusCreated && json.Unmarshal(b, &out) == nil && out.ID != "":
			op.Type, op.DealID = "ok", out.ID
			r.hist.add(op)
			return out.ID, true
		case err != nil && !refused(err), st >= 500:
			op.Type = "info"
		default:
			op.Type = "fail"
		}
		if err != nil {
			op.Err = err.Error()
		}
		r.hist.add(op)
		if ctx.Err() != nil {
			return "", false
		}
		time.Sleep(time.Duration(100*(1+try)) * time.Millisecond)
	}
	return "", false
}

// close closes deal id with outcome, retrying like a CRM webhook sender
// while the outcome is unknown; it reports whether the close was
// acknowledged.
func (r *run) close(ctx context.Context, p dealPlan, id, outcome, via string) bool {
	for try := range 8 {
		typ, status := r.closeOnce(ctx, p, id, outcome, via, "close-"+outcome)
		switch {
		case typ == "ok":
			return true
		case typ == "fail" && status != 0:
			return false // a definite answer: conflict, illegal transition
		}
		if ctx.Err() != nil {
			return false
		}
		time.Sleep(time.Duration(150*(1+try)) * time.Millisecond)
	}
	return false
}

func (r *run) closeOnce(ctx context.Context, p dealPlan, id, outcome, via, f string) (string, int) {
	op := Op{Deal: p.Idx, DealID: id, F: f, Via: via, Invoke: r.since()}
	defer func() { op.Complete = r.since(); r.hist.add(op) }()
	if via == "slow" {
		v := 1
		_, err := r.slowStore.CloseDeal(ctx, id, domain.Outcome(outcome), &v, domain.Metadata{Actor: "chaos-slow-producer"})
		switch {
		case err == nil:
			op.Type = "ok"
		case errors.Is(err, domain.ErrVersionConflict) || errors.As(err, new(*domain.TransitionError)):
			op.Type, op.Status, op.Err = "fail", 409, err.Error()
		default:
			op.Type, op.Err = "info", err.Error()
		}
		return op.Type, op.Status
	}
	st, _, err := r.call(ctx, http.MethodPost, "/api/v1/deals/"+id+"/close", fmt.Sprintf(`{"outcome":%q,"version":1}`, outcome))
	op.Status = st
	switch {
	case err == nil && st == http.StatusOK:
		op.Type = "ok"
	case err != nil && refused(err):
		op.Type, op.Status, op.Err = "fail", 0, err.Error()
	case err != nil || st >= 500:
		op.Type = "info"
		if err != nil {
			op.Err = err.Error()
		}
	default:
		op.Type = "fail"
	}
	return op.Type, op.Status
}

// malformed sends F12 bodies the API must reject without writing.
func (r *run) malformedRequests(ctx context.Context) []int {
	bodies := []string{`{"customer":`, `{"outcome":"won","extra":1}`, "{\"customer\":{\"id\":\"\xff\xfe\"}}",
		`{"customer":{"id":"C-1","name":"x"},"currency":"USD","lines":[{"sku":"SKU-1","description":"d","quantity":1,"unit_price":12.5}]}`}
	big := bytes.Repeat([]byte("x"), 10<<20)
	bodies = append(bodies, `{"customer":{"id":"`+string(big)+`"}}`)
	var out []int
	for _, b := range bodies {
		st := -1
		// The API may be down (another fault): retry until it answers.
		for try := 0; try < 40 && ctx.Err() == nil; try++ {
			s, _, err := r.call(ctx, http.MethodPost, "/api/v1/deals", b)
			if err == nil && s < 500 {
				st = s
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		out = append(out, st)
	}
	return out
}
