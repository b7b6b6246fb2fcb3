package bench

import (
	"fmt"
	"html"
	"math"
	"strings"
)

var kindColor = map[string]string{KindCeiling: "#7f7f7f", KindDealbridge: "#1f77b4", KindRiver: "#ff7f0e"}

// SVG draws two panels: sustained throughput of every maximum-rate phase
// (and the ceiling), and commit→invoice latency p50/p99 of dealbridge and
// River at each fixed rate, on a log scale.
func (r *Result) SVG() string {
	const (
		W     = 1000.0
		left  = 390.0
		right = 90.0
		rowH  = 20.0
	)
	type bar struct {
		label string
		color string
		v, v2 float64 // v2: a second, lighter mark (p50) on the latency panel
		note  string
	}
	var thr []bar
	for _, p := range r.Phases {
		if p.Kind == KindCeiling || p.Rate == 0 {
			label := p.Name
			if p.Kind == KindDealbridge && p.Group == GroupMain {
				label += " (main)"
			}
			thr = append(thr, bar{label: label, color: kindColor[p.Kind], v: p.Sustained, note: fmt.Sprintf("%.0f/s", p.Sustained)})
		}
	}
	var lat []bar
	for _, p := range r.Phases {
		if p.Rate > 0 && p.Latency != nil && p.Group == GroupMain {
			label := fmt.Sprintf("%s at %.0f/s", p.Kind, p.Rate)
			if p.Round > 0 {
				label += fmt.Sprintf(", round %d", p.Round)
			}
			lat = append(lat, bar{label: label, color: kindColor[p.Kind],
				v: p.Latency.P99, v2: p.Latency.P50, note: fmt.Sprintf("p50 %.1f · p99 %.1f ms", p.Latency.P50, p.Latency.P99)})
		}
	}
	top := 50.0
	h1 := float64(len(thr))*rowH + 40
	h2 := float64(len(lat))*rowH + 40
	H := top + h1 + 30 + h2 + 40
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="11">`+"\n", W, H, W, H)
	p(`<rect width="100%%" height="100%%" fill="white"/>` + "\n")
	title := "dealbridge benchmark"
	if r.Quick {
		title += " (quick mode: not a measurement)"
	}
	p(`<text x="10" y="20" font-size="14" font-weight="bold">%s</text>`+"\n", html.EscapeString(title))
	p(`<text x="10" y="36" fill="#555">%s · %d CPUs · %s</text>`+"\n", html.EscapeString(r.Started.UTC().Format("2006-01-02")), r.Machine.CPUs,
		html.EscapeString(firstWords(r.Machine.Postgres, 2)))

	// Panel 1: throughput, linear.
	y0 := top
	p(`<text x="10" y="%.0f" font-weight="bold">Sustained throughput at maximum rate (deals/s; the ceiling: close tx/s)</text>`+"\n", y0+12)
	xMax := 1.0
	for _, t := range thr {
		xMax = math.Max(xMax, t.v)
	}
	xMax = niceCeil(xMax)
	x := func(v float64) float64 { return left + (W-left-right)*v/xMax }
	gy := y0 + 22
	for i := 0; i <= 4; i++ {
		v := xMax * float64(i) / 4
		p(`<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#e5e5e5"/>`+"\n", x(v), x(v), gy, gy+float64(len(thr))*rowH)
		p(`<text x="%.1f" y="%.1f" text-anchor="middle" fill="#777">%.0f</text>`+"\n", x(v), gy+float64(len(thr))*rowH+12, v)
	}
	for i, t := range thr {
		y := gy + float64(i)*rowH
		p(`<text x="%.0f" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y+13, html.EscapeString(t.label))
		p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", left, y+3, math.Max(1, x(t.v)-left), rowH-6, t.color)
		p(`<text x="%.1f" y="%.1f">%s</text>`+"\n", x(t.v)+4, y+13, html.EscapeString(t.note))
	}

	// Panel 2: latency, log scale.
	y0 = top + h1 + 30
	p(`<text x="10" y="%.0f" font-weight="bold">Commit → invoice latency at fixed rates (ms, log scale; dark: p99, light: p50)</text>`+"\n", y0+12)
	lMax := 10.0
	for _, t := range lat {
		lMax = math.Max(lMax, t.v)
	}
	decades := math.Ceil(math.Log10(lMax))
	lx := func(v float64) float64 {
		v = math.Max(v, 1)
		return left + (W-left-right)*math.Log10(v)/decades
	}
	gy = y0 + 22
	for d := 0.0; d <= decades; d++ {
		v := math.Pow(10, d)
		p(`<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#e5e5e5"/>`+"\n", lx(v), lx(v), gy, gy+float64(len(lat))*rowH)
		p(`<text x="%.1f" y="%.1f" text-anchor="middle" fill="#777">%g</text>`+"\n", lx(v), gy+float64(len(lat))*rowH+12, v)
	}
	if 50 < math.Pow(10, decades) {
		p(`<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#d62728" stroke-dasharray="4 3"/>`+"\n", lx(50), lx(50), gy-4, gy+float64(len(lat))*rowH)
		p(`<text x="%.1f" y="%.1f" fill="#d62728" text-anchor="middle">50 ms target</text>`+"\n", lx(50), gy-6)
	}
	for i, t := range lat {
		y := gy + float64(i)*rowH
		p(`<text x="%.0f" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y+13, html.EscapeString(t.label))
		p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", left, y+3, math.Max(1, lx(t.v)-left), rowH-6, t.color)
		p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="white" fill-opacity="0.55"/>`+"\n", left, y+3, math.Max(1, lx(t.v2)-left), rowH-6)
		p(`<text x="%.1f" y="%.1f">%s</text>`+"\n", lx(t.v)+4, y+13, html.EscapeString(t.note))
	}
	// Legend.
	ly := H - 14
	lx0 := 10.0
	for _, k := range []string{KindCeiling, KindDealbridge, KindRiver} {
		p(`<rect x="%.0f" y="%.0f" width="10" height="10" fill="%s"/><text x="%.0f" y="%.0f">%s</text>`+"\n", lx0, ly-9, kindColor[k], lx0+14, ly, k)
		lx0 += 110
	}
	p("</svg>\n")
	return b.String()
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	e := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*e {
			return m * e
		}
	}
	return 10 * e
}
