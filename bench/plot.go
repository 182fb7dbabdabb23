package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"sort"
	"strings"
	"time"
)

// WriteSVG draws the cumulative distributions of TTFT, ITL and E2EL side by
// side, with the median and the largest configured percentile marked. The
// SVG is self-contained (no scripts, no external fonts).
func (r *Result) WriteSVG(w io.Writer) error {
	ttft, itl, e2el := r.Samples()
	top := 99.0
	for _, p := range r.Percentiles {
		top = max(top, p)
	}
	const (
		pw, ph = 360, 260 // panel size
		ml, mt = 60, 50   // margins
		gap    = 40
	)
	width := ml + 3*(pw+gap)
	height := mt + ph + 60
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	title := fmt.Sprintf("%s%s  model %s  rate %s  %d ok / %d failed",
		strings.TrimRight(r.BaseURL, "/"), r.Endpoint, r.Model, r.RequestRate, r.Completed, r.Failed)
	fmt.Fprintf(&b, `<text x="%d" y="20" font-size="13" font-weight="bold">%s</text>`+"\n", ml, html.EscapeString(title))
	panels := []struct {
		name  string
		data  []time.Duration
		color string
	}{{"TTFT", ttft, "#1f77b4"}, {"ITL", itl, "#2ca02c"}, {"E2EL", e2el, "#d62728"}}
	for i, p := range panels {
		x0 := ml + i*(pw+gap)
		cdfPanel(&b, p.name, p.data, p.color, top, x0, mt, pw, ph)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteSVGFile writes WriteSVG's output to path.
func (r *Result) WriteSVGFile(path string) error { return writeFile(path, r.WriteSVG) }

func cdfPanel(b *strings.Builder, name string, data []time.Duration, color string, top float64, x0, y0, w, h int) {
	v := make([]float64, len(data))
	for i, d := range data {
		v[i] = ms(d)
	}
	sort.Float64s(v)
	fmt.Fprintf(b, `<g><text x="%d" y="%d" font-size="12" font-weight="bold">%s CDF (n=%d)</text>`+"\n", x0, y0-8, name, len(v))
	fmt.Fprintf(b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>`+"\n", x0, y0, w, h)
	xmax := 1.0
	if len(v) > 0 {
		xmax = niceCeil(v[len(v)-1])
	}
	sx := func(x float64) float64 { return float64(x0) + x/xmax*float64(w) }
	sy := func(y float64) float64 { return float64(y0+h) - y*float64(h) }
	for _, q := range []float64{0, 0.25, 0.5, 0.75, 1} {
		y := sy(q)
		fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/><text x="%d" y="%.1f" text-anchor="end">%.2f</text>`+"\n", x0, y, x0+w, y, x0-4, y+4, q)
		x := sx(q * xmax)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/><text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", x, y0, x, y0+h, x, y0+h+14, fmtTick(q*xmax))
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="middle">%s (ms)</text>`+"\n", x0+w/2, y0+h+30, name)
	if len(v) == 0 {
		fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="middle" fill="#888">no samples</text></g>`+"\n", x0+w/2, y0+h/2)
		return
	}
	// A step function; thinned to at most ~2 points per pixel column.
	var pts strings.Builder
	fmt.Fprintf(&pts, "%.1f,%.1f", sx(0), sy(0))
	step := max(1, len(v)/(2*w))
	for i := 0; i < len(v); i += step {
		fmt.Fprintf(&pts, " %.1f,%.1f %.1f,%.1f", sx(v[i]), sy(float64(i)/float64(len(v))), sx(v[i]), sy(float64(i+1)/float64(len(v))))
	}
	fmt.Fprintf(&pts, " %.1f,%.1f", sx(v[len(v)-1]), sy(1))
	fmt.Fprintf(b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`+"\n", color, pts.String())
	for k, p := range []float64{50, top} {
		q := Percentile(v, p)
		x := sx(q)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-dasharray="4 3"/>`, x, y0, x, y0+h, color)
		fmt.Fprintf(b, `<text x="%.1f" y="%d" fill="%s">p%s %s</text>`+"\n", x+3, y0+14+14*k, color, pctKey(p), fmtTick(q))
	}
	b.WriteString("</g>\n")
}

// niceCeil rounds x up to 1, 2 or 5 times a power of ten.
func niceCeil(x float64) float64 {
	if x <= 0 {
		return 1
	}
	e := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*e >= x {
			return m * e
		}
	}
	return 10 * e
}

func fmtTick(x float64) string {
	switch {
	case x >= 100:
		return fmt.Sprintf("%.0f", x)
	case x >= 1:
		return fmt.Sprintf("%.1f", x)
	default:
		return fmt.Sprintf("%.3g", x)
	}
}
