package dashboard

import (
	"context"
	"fmt"
	"html/template"
	"net/http"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/outbox"
)

type count struct {
	Key string
	N   int
}

type overviewData struct {
	Deals        []count
	Sagas        []count
	RelayLag     time.Duration
	Unrelayed    int
	Queue        []queue.TopicStats
	DeadByClass  []count
	OpenDead     int
	OpenAlerts   int
	Alerts       []postgres.AlertView
	Breaker      string
	BreakerKnown bool
	Chart        template.HTML
	Invoiced1h   int
	Failures1h   int
	MaxLag1h     float64
	MeasuredAt   time.Time
	MakerChecker bool
}

func (d *Dashboard) overview(w http.ResponseWriter, r *http.Request) {
	data, err := d.collect(r.Context())
	if err == nil && !unmasked(r) {
		err = httpapi.MaskAlerts(r.Context(), d.pool, data.Alerts)
	}
	if err != nil {
		d.fail(w, r, err)
		return
	}
	d.render(w, r, http.StatusOK, "overview", view{Title: "Overview", Nav: "overview", Refresh: int(d.cfg.Refresh.Seconds()), Data: data})
}

func (d *Dashboard) collect(ctx context.Context) (*overviewData, error) {
	o := &overviewData{MeasuredAt: time.Now()}
	var series *chartSeries
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		var err error
		o.Deals, err = d.counts(gctx, `SELECT status, count(*) FROM deals GROUP BY 1 ORDER BY 1`)
		return err
	})
	g.Go(func() error {
		var err error
		o.Sagas, err = d.counts(gctx, `SELECT state, count(*) FROM invoice_sagas GROUP BY 1 ORDER BY 1`)
		return err
	})
	g.Go(func() error {
		var err error
		o.DeadByClass, err = d.counts(gctx, `SELECT error_class, count(*) FROM dead_letters WHERE state = 'open' GROUP BY 1 ORDER BY 2 DESC, 1`)
		for _, c := range o.DeadByClass {
			o.OpenDead += c.N
		}
		return err
	})
	g.Go(func() error {
		b, err := outbox.MeasureBacklog(gctx, d.pool)
		if err != nil {
			return err
		}
		o.Unrelayed, o.RelayLag = int(b.Messages), b.OldestAge
		return nil
	})
	g.Go(func() error {
		var err error
		o.Queue, err = queue.Stats(gctx, d.pool)
		return err
	})
	g.Go(func() error {
		return d.pool.QueryRow(gctx, `SELECT count(*) FROM alerts WHERE state = 'open'`).Scan(&o.OpenAlerts)
	})
	g.Go(func() error {
		var err error
		o.Alerts, err = d.store.ListAlerts(gctx, "open", 5)
		return err
	})
	g.Go(func() error {
		var err error
		o.MakerChecker, err = d.store.MakerChecker(gctx)
		return err
	})
	g.Go(func() error {
		var err error
		series, err = d.lastHour(gctx)
		return err
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	if d.cfg.BreakerState != nil {
		o.Breaker, o.BreakerKnown = d.cfg.BreakerState()
	}
	o.Chart = series.svg()
	for i := range series.invoiced {
		o.Invoiced1h += series.invoiced[i]
		o.Failures1h += series.failures[i]
		o.MaxLag1h = max(o.MaxLag1h, series.lag[i])
	}
	return o, nil
}

func (d *Dashboard) counts(ctx context.Context, sql string) ([]count, error) {
	rows, err := d.pool.Query(ctx, sql)
	if err != nil {
		return nil, fmt.Errorf("cannot count: %w", err)
	}
	defer rows.Close()
	var out []count
	for rows.Next() {
		var c count
		if err := rows.Scan(&c.Key, &c.N); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

const chartMinutes = 60

// chartSeries is the last hour by minute, oldest first, computed from the
// event log: invoices created, failures (failed ERP attempts and dead
// letters), and the largest close-to-invoice lag of the invoices of each
// minute.
type chartSeries struct {
	start    time.Time
	invoiced []int
	failures []int
	lag      []float64 // seconds
}

func (d *Dashboard) lastHour(ctx context.Context) (*chartSeries, error) {
	var start time.Time
	if err := d.pool.QueryRow(ctx, `SELECT date_trunc('minute', now()) - make_interval(mins => $1)`, chartMinutes-1).Scan(&start); err != nil {
		return nil, fmt.Errorf("cannot read the clock: %w", err)
	}
	s := &chartSeries{start: start, invoiced: make([]int, chartMinutes), failures: make([]int, chartMinutes), lag: make([]float64, chartMinutes)}
	idx := func(t time.Time) int {
		i := int(t.Sub(start) / time.Minute)
		if i < 0 || i >= chartMinutes {
			return -1
		}
		return i
	}
	rows, err := d.pool.Query(ctx, `SELECT date_trunc('minute', recorded_at), type, count(*) FROM events
		WHERE recorded_at >= $1 AND type IN ('InvoiceCreated', 'InvoiceAttemptFailed', 'MessageDeadLettered')
		GROUP BY 1, 2`, start)
	if err != nil {
		return nil, fmt.Errorf("cannot read throughput: %w", err)
	}
	for rows.Next() {
		var (
			m   time.Time
			typ string
			n   int
		)
		if err := rows.Scan(&m, &typ, &n); err != nil {
			rows.Close()
			return nil, err
		}
		if i := idx(m); i >= 0 {
			if typ == "InvoiceCreated" {
				s.invoiced[i] += n
			} else {
				s.failures[i] += n
			}
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	// Lag: from the close (or the re-inject that reinstated the deal) to
	// the invoice, for each invoice of the hour.
	rows, err = d.pool.Query(ctx, `SELECT date_trunc('minute', ic.recorded_at), max(EXTRACT(EPOCH FROM ic.recorded_at - w.recorded_at))::float8
		FROM events ic
		JOIN LATERAL (SELECT recorded_at FROM events w
		              WHERE w.stream_id = 'deal-' || (ic.payload->>'deal_id') AND w.type IN ('DealWon', 'DealReinstated')
		                AND w.position < ic.position
		              ORDER BY w.stream_version DESC LIMIT 1) w ON true
		WHERE ic.type = 'InvoiceCreated' AND ic.recorded_at >= $1
		GROUP BY 1`, start)
	if err != nil {
		return nil, fmt.Errorf("cannot read lag: %w", err)
	}
	for rows.Next() {
		var (
			m   time.Time
			lag float64
		)
		if err := rows.Scan(&m, &lag); err != nil {
			rows.Close()
			return nil, err
		}
		if i := idx(m); i >= 0 {
			s.lag[i] = lag
		}
	}
	rows.Close()
	return s, rows.Err()
}

func (d *Dashboard) chartSVG(w http.ResponseWriter, r *http.Request) {
	s, err := d.lastHour(r.Context())
	if err != nil {
		d.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "image/svg+xml")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?>`+"\n")
	fmt.Fprint(w, strings.Replace(string(s.svg()), "<svg ", `<svg xmlns="http://www.w3.org/2000/svg" `, 1))
}

// svg draws three panels sharing the time axis. Everything in it is a
// number or a fixed string, so it is safe to emit as HTML.
func (s *chartSeries) svg() template.HTML {
	const (
		width  = 760.0
		left   = 56.0
		right  = 12.0
		panelH = 70.0
		gap    = 34.0
		top    = 22.0
	)
	plotW := width - left - right
	barW := plotW / chartMinutes
	var b strings.Builder
	height := top + 3*panelH + 2*gap + 30
	fmt.Fprintf(&b, `<svg class="chart" viewBox="0 0 %.0f %.0f" width="100%%" role="img" aria-label="Throughput, failures and lag over the last hour">`, width, height)
	panel := func(k int, title, color string, vals []float64, bars bool, unit string) {
		y0 := top + float64(k)*(panelH+gap)
		maxV := 0.0
		for _, v := range vals {
			maxV = max(maxV, v)
		}
		scale := maxV
		if scale == 0 {
			scale = 1
		}
		total := 0.0
		for _, v := range vals {
			total += v
		}
		summary := fmt.Sprintf("total %.0f", total)
		if !bars {
			summary = fmt.Sprintf("max %.1f%s", maxV, unit)
		}
		fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" class="chart-title" fill="#1f2937" font-size="12" font-weight="600">%s</text>`, left, y0-8, title)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" fill="#6b7280" font-size="11" text-anchor="end">%s</text>`, width-right, y0-8, summary)
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.1f" width="%.1f" height="%.0f" fill="#f9fafb" stroke="#e5e7eb"/>`, left, y0, plotW, panelH)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" fill="#6b7280" font-size="10" text-anchor="end">%s</text>`, left-6, y0+9, trimNum(maxV)+unit)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" fill="#6b7280" font-size="10" text-anchor="end">0</text>`, left-6, y0+panelH)
		if bars {
			for i, v := range vals {
				if v == 0 {
					continue
				}
				h := v / scale * (panelH - 4)
				fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s: %.0f</title></rect>`,
					left+float64(i)*barW+1, y0+panelH-h, max(barW-2, 1), h, color, minuteLabel(i), v)
			}
			return
		}
		var pts []string
		for i, v := range vals {
			x := left + float64(i)*barW + barW/2
			y := y0 + panelH - v/scale*(panelH-4)
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x, y))
		}
		fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`, strings.Join(pts, " "), color)
	}
	inv := make([]float64, chartMinutes)
	fail := make([]float64, chartMinutes)
	for i := range inv {
		inv[i] = float64(s.invoiced[i])
		fail[i] = float64(s.failures[i])
	}
	panel(0, "Invoices created per minute", "#16a34a", inv, true, "")
	panel(1, "Failures per minute (failed ERP attempts and dead letters)", "#dc2626", fail, true, "")
	panel(2, "Close-to-invoice lag, slowest per minute", "#2563eb", s.lag, false, "s")
	yAxis := top + 3*panelH + 2*gap + 14
	for _, t := range []struct {
		i     int
		label string
	}{{0, "-60 min"}, {15, "-45"}, {30, "-30"}, {45, "-15"}, {59, "now"}} {
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" fill="#6b7280" font-size="10" text-anchor="middle">%s</text>`, left+float64(t.i)*barW+barW/2, yAxis, t.label)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String()) // #nosec: built only from numbers and constants above
}

func minuteLabel(i int) string {
	if i == chartMinutes-1 {
		return "this minute"
	}
	return fmt.Sprintf("%d min ago", chartMinutes-1-i)
}

func trimNum(v float64) string {
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d", int64(v))
	}
	return fmt.Sprintf("%.1f", v)
}
