package chaos

import (
	"fmt"
	"html"
	"math"
	"slices"
	"strings"
)

// SVG draws the Jepsen-style timeline: one lane per fault kind with its
// windows, then throughput (closes acknowledged and deals invoiced per
// second), relay lag, dead-letter depth and work-queue depth, and the ERP
// attempt rate, with every fault window shaded across the panels.
func (r *Report) SVG() string {
	const (
		W      = 1100.0
		left   = 170.0
		right  = 20.0
		laneH  = 13.0
		panelH = 110.0
		gap    = 28.0
	)
	var kinds []Kind
	for _, w := range r.Windows {
		if !slices.Contains(kinds, w.Kind) {
			kinds = append(kinds, w.Kind)
		}
	}
	fnum := func(k Kind) string { return fmt.Sprintf("%3s", strings.TrimPrefix(infoOf(k).f, "F")) + string(k) }
	slices.SortFunc(kinds, func(a, b Kind) int { return strings.Compare(fnum(a), fnum(b)) })
	tMax := math.Max(r.Total, 1)
	if n := len(r.Samples); n > 0 {
		tMax = math.Max(tMax, r.Samples[n-1].T)
	}
	x := func(t float64) float64 { return left + (W-left-right)*t/tMax }
	top := 40.0
	lanesH := float64(len(kinds))*laneH + 10
	type series struct {
		name  string
		color string
		pts   [][2]float64
	}
	rate := func(get func(Sample) int) [][2]float64 {
		var out [][2]float64
		for i := 1; i < len(r.Samples); i++ {
			a, b := r.Samples[i-1], r.Samples[i]
			va, vb := get(a), get(b)
			if va < 0 || vb < 0 || b.T <= a.T {
				continue
			}
			out = append(out, [2]float64{b.T, math.Max(0, float64(vb-va)/(b.T-a.T))})
		}
		return out
	}
	level := func(get func(Sample) float64) [][2]float64 {
		var out [][2]float64
		for _, s := range r.Samples {
			if v := get(s); v >= 0 {
				out = append(out, [2]float64{s.T, v})
			}
		}
		return out
	}
	panels := []struct {
		title string
		ss    []series
	}{
		{"throughput (per second)", []series{
			{"closes acknowledged", "#1f77b4", rate(func(s Sample) int { return s.Acked })},
			{"deals invoiced", "#2ca02c", rate(func(s Sample) int { return s.Invoiced })},
		}},
		{"relay lag", []series{
			{"oldest unrelayed outbox row (s)", "#d62728", level(func(s Sample) float64 { return s.LagSeconds })},
			{"unrelayed rows / 10", "#ff7f0e", level(func(s Sample) float64 {
				if s.Unrelayed < 0 {
					return -1
				}
				return float64(s.Unrelayed) / 10
			})},
		}},
		{"dead letters and work queue", []series{
			{"open dead letters", "#9467bd", level(func(s Sample) float64 { return float64(s.DLQOpen) })},
			{"work-queue rows / 10", "#8c564b", level(func(s Sample) float64 {
				if s.Queue < 0 {
					return -1
				}
				return float64(s.Queue) / 10
			})},
		}},
		{"ERP (per second)", []series{
			{"attempts (incl. retries)", "#e377c2", rate(func(s Sample) int { return s.ERPAttempts })},
			{"creates", "#17becf", rate(func(s Sample) int { return s.ERPCreates })},
		}},
	}
	H := top + lanesH + float64(len(panels))*(panelH+gap) + 50
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="11">`+"\n", W, H, W, H)
	p(`<rect width="100%%" height="100%%" fill="white"/>` + "\n")
	p(`<text x="10" y="20" font-size="14" font-weight="bold">%s</text>`+"\n", html.EscapeString(r.Title))
	p(`<text x="10" y="34" fill="#555">seed %d · %d deals · lost %d, duplicated %d, both %d, stuck %d, unexpected %d · load ends %.0f s, drained %.0f s</text>`+"\n",
		r.Seed, r.Deals, r.Check.Counts[VLost], r.Check.Counts[VDuplicated], r.Check.Counts[VBoth], r.Check.Counts[VStuck], r.Check.Counts[VUnexpected],
		r.LoadEnd, r.DrainEnd)
	palette := []string{"#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999", "#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3", "#a6d854", "#ffd92f", "#e5c494", "#b3b3b3"}
	colorOf := func(k Kind) string { return palette[slices.Index(kinds, k)%len(palette)] }
	// Fault lanes.
	for i, k := range kinds {
		y := top + 5 + float64(i)*laneH
		p(`<text x="%.0f" y="%.1f" text-anchor="end" fill="#333">%s %s</text>`+"\n", left-6, y+9, infoOf(k).f, k)
		p(`<line x1="%.0f" x2="%.0f" y1="%.1f" y2="%.1f" stroke="#eee"/>`+"\n", left, W-right, y+laneH/2, y+laneH/2)
		for _, w := range r.Windows {
			if w.Kind != k {
				continue
			}
			x0, x1 := x(w.Start), math.Max(x(w.End), x(w.Start)+2)
			p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s %.1f–%.1f s %s</title></rect>`+"\n",
				x0, y+1, x1-x0, laneH-2, colorOf(k), k, w.Start, w.End, html.EscapeString(w.Note+" "+w.Err))
		}
	}
	// Panels.
	py := top + lanesH + gap
	for _, pan := range panels {
		yMax := 1.0
		for _, s := range pan.ss {
			for _, pt := range s.pts {
				yMax = math.Max(yMax, pt[1])
			}
		}
		yMax = niceCeil(yMax)
		y := func(v float64) float64 { return py + panelH - panelH*v/yMax }
		// Shade every fault window, and the load end / drain end.
		for _, w := range r.Windows {
			if w.End-w.Start < 0.2 {
				p(`<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="%s" stroke-opacity="0.5"/>`+"\n", x(w.Start), x(w.Start), py, py+panelH, colorOf(w.Kind))
				continue
			}
			p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" fill-opacity="0.12"/>`+"\n", x(w.Start), py, x(w.End)-x(w.Start), panelH, colorOf(w.Kind))
		}
		for _, m := range []struct {
			t    float64
			name string
		}{{r.LoadEnd, "load end"}, {r.DrainEnd, "drained"}} {
			p(`<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#000" stroke-dasharray="4 3"/>`+"\n", x(m.t), x(m.t), py, py+panelH)
			p(`<text x="%.1f" y="%.1f" fill="#000" font-size="9">%s</text>`+"\n", x(m.t)+2, py+9, m.name)
		}
		p(`<rect x="%.0f" y="%.1f" width="%.0f" height="%.0f" fill="none" stroke="#999"/>`+"\n", left, py, W-left-right, panelH)
		p(`<text x="%.0f" y="%.1f" font-weight="bold">%s</text>`+"\n", left, py-6, pan.title)
		p(`<text x="%.0f" y="%.1f" text-anchor="end">%g</text><text x="%.0f" y="%.1f" text-anchor="end">0</text>`+"\n", left-4, py+9, yMax, left-4, py+panelH)
		lx := left + 220
		for _, s := range pan.ss {
			var pts []string
			for _, pt := range s.pts {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(pt[0]), y(pt[1])))
			}
			if len(pts) > 0 {
				p(`<polyline fill="none" stroke="%s" stroke-width="1.3" points="%s"/>`+"\n", s.color, strings.Join(pts, " "))
			}
			p(`<rect x="%.0f" y="%.1f" width="10" height="3" fill="%s"/><text x="%.0f" y="%.1f">%s</text>`+"\n", lx, py-10, s.color, lx+14, py-6, html.EscapeString(s.name))
			lx += 14 + 6.5*float64(len(s.name)) + 20
		}
		py += panelH + gap
	}
	// Time axis.
	step := niceCeil(tMax / 10)
	for t := 0.0; t <= tMax+0.001; t += step {
		p(`<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#999"/><text x="%.1f" y="%.1f" text-anchor="middle">%.0f s</text>`+"\n",
			x(t), x(t), py-gap, py-gap+4, x(t), py-gap+16, t)
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
		if m*e >= v {
			return m * e
		}
	}
	return 10 * e
}
