package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Sample is one scrape of a /metrics page (a backend's, an engine's, a router's): every counter and gauge summed
// per metric name ("name") and per series ("name{k=\"v\",...}", labels in
// the exposition's order), and histograms' sample counts and sums as
// "<name>_count" and "<name>_sum".
type Sample map[string]float64

// ParseMetrics reads Prometheus text format.
func ParseMetrics(r io.Reader) (Sample, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	s := Sample{}
	for name, fam := range families {
		for _, m := range fam.GetMetric() {
			var v float64
			key := name
			switch fam.GetType() {
			case dto.MetricType_COUNTER:
				v = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				v = m.GetGauge().GetValue()
			case dto.MetricType_UNTYPED:
				v = m.GetUntyped().GetValue()
			case dto.MetricType_HISTOGRAM:
				v = float64(m.GetHistogram().GetSampleCount())
				key += "_count"
			default:
				continue
			}
			s.add(key, m.GetLabel(), v)
			if fam.GetType() == dto.MetricType_HISTOGRAM {
				s.add(name+"_sum", m.GetLabel(), m.GetHistogram().GetSampleSum())
			}
		}
	}
	return s, nil
}

// add adds v to key and to key's series of labels.
func (s Sample) add(key string, labels []*dto.LabelPair, v float64) {
	s[key] += v
	if len(labels) == 0 {
		return
	}
	var b strings.Builder
	b.WriteString(key + "{")
	for i, l := range labels {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", l.GetName(), l.GetValue())
	}
	b.WriteByte('}')
	s[b.String()] += v
}

// Scrape fetches and parses baseURL/metrics with hc.
func Scrape(ctx context.Context, hc *http.Client, baseURL string) (Sample, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", baseURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: status %d", baseURL, resp.StatusCode)
	}
	return ParseMetrics(resp.Body)
}

// Delta is after - before per name (counters over one benchmark run).
func (after Sample) Delta(before Sample) Sample {
	d := Sample{}
	for k, v := range after {
		d[k] = v - before[k]
	}
	return d
}
