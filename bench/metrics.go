package bench

import (
	"math"
	"sort"
	"strconv"
	"time"
)

// Stats summarises one latency metric in milliseconds.
type Stats struct {
	Count  int     `json:"count"`
	Mean   float64 `json:"mean"`
	Median float64 `json:"median"`
	Std    float64 `json:"std"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	// Percentiles maps "99" (as given in Config.Percentiles) to its value.
	Percentiles map[string]float64 `json:"percentiles"`
}

// Failure groups failed requests by reason.
type Failure struct {
	Reason string `json:"reason"`
	Count  int    `json:"count"`
}

// Result is a benchmark's outcome. Latency metrics cover successful
// requests only; Failed counts the others and Failures says why.
type Result struct {
	Endpoint       string    `json:"endpoint"`
	BaseURL        string    `json:"base_url"`
	Model          string    `json:"model"`
	Started        time.Time `json:"started"`
	NumPrompts     int       `json:"num_prompts"`
	RequestRate    string    `json:"request_rate"`
	Burstiness     float64   `json:"burstiness"`
	MaxConcurrency int       `json:"max_concurrency"`
	Percentiles    []float64 `json:"percentile_list"`

	// Duration runs from the start to the end of the last request.
	Duration        time.Duration `json:"-"`
	DurationSeconds float64       `json:"duration_s"`
	Completed       int           `json:"completed"`
	Failed          int           `json:"failed"`
	// NotSent counts requests never sent because the run was cancelled.
	NotSent      int       `json:"not_sent"`
	Failures     []Failure `json:"failures,omitempty"`
	UsageMissing int       `json:"usage_missing"`

	TotalInputTokens     int     `json:"total_input_tokens"`
	TotalOutputTokens    int     `json:"total_output_tokens"`
	RequestThroughput    float64 `json:"request_throughput"`
	OutputThroughput     float64 `json:"output_throughput"`
	TotalTokenThroughput float64 `json:"total_token_throughput"`

	TTFT Stats `json:"ttft_ms"`
	TPOT Stats `json:"tpot_ms"`
	ITL  Stats `json:"itl_ms"`
	E2EL Stats `json:"e2el_ms"`

	// Turns and FollowUps: the multi-turn workload's TTFT and cached
	// tokens per turn and over turns >= 2 (nil for other workloads).
	Turns     []TurnStats `json:"turns,omitempty"`
	FollowUps *TurnStats  `json:"follow_ups,omitempty"`

	Records []Record `json:"requests"`
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// summarize fills the aggregate fields of res from res.Records.
func summarize(res *Result) {
	var ttft, tpot, itl, e2el []float64
	reasons := map[string]int{}
	res.Completed, res.Failed, res.UsageMissing = 0, 0, 0
	res.TotalInputTokens, res.TotalOutputTokens = 0, 0
	for i := range res.Records {
		r := &res.Records[i]
		if !r.OK() {
			res.Failed++
			reasons[r.Err]++
			continue
		}
		res.Completed++
		if r.UsageMissing {
			res.UsageMissing++
		}
		res.TotalInputTokens += r.PromptTokens
		res.TotalOutputTokens += r.OutputTokens
		ttft = append(ttft, ms(r.TTFT))
		e2el = append(e2el, ms(r.Latency))
		if r.OutputTokens > 1 {
			tpot = append(tpot, ms(r.Latency-r.TTFT)/float64(r.OutputTokens-1))
		}
		for _, g := range r.ITL {
			itl = append(itl, ms(g))
		}
	}
	res.Failures = res.Failures[:0]
	for reason, n := range reasons {
		res.Failures = append(res.Failures, Failure{Reason: reason, Count: n})
	}
	sort.Slice(res.Failures, func(i, j int) bool {
		if res.Failures[i].Count != res.Failures[j].Count {
			return res.Failures[i].Count > res.Failures[j].Count
		}
		return res.Failures[i].Reason < res.Failures[j].Reason
	})
	res.DurationSeconds = res.Duration.Seconds()
	if s := res.Duration.Seconds(); s > 0 {
		res.RequestThroughput = float64(res.Completed) / s
		res.OutputThroughput = float64(res.TotalOutputTokens) / s
		res.TotalTokenThroughput = float64(res.TotalInputTokens+res.TotalOutputTokens) / s
	}
	res.TTFT = summary(ttft, res.Percentiles)
	res.TPOT = summary(tpot, res.Percentiles)
	res.ITL = summary(itl, res.Percentiles)
	res.E2EL = summary(e2el, res.Percentiles)
	summarizeTurns(res)
}

func summary(v []float64, pcts []float64) Stats {
	s := Stats{Count: len(v), Percentiles: map[string]float64{}}
	if len(v) == 0 {
		for _, p := range pcts {
			s.Percentiles[pctKey(p)] = 0
		}
		return s
	}
	sorted := append([]float64(nil), v...)
	sort.Float64s(sorted)
	var sum float64
	for _, x := range sorted {
		sum += x
	}
	s.Mean = sum / float64(len(sorted))
	var sq float64
	for _, x := range sorted {
		sq += (x - s.Mean) * (x - s.Mean)
	}
	s.Std = math.Sqrt(sq / float64(len(sorted)))
	s.Min, s.Max = sorted[0], sorted[len(sorted)-1]
	s.Median = Percentile(sorted, 50)
	for _, p := range pcts {
		s.Percentiles[pctKey(p)] = Percentile(sorted, p)
	}
	return s
}

func pctKey(p float64) string { return strconv.FormatFloat(p, 'f', -1, 64) }

// Percentile interpolates linearly between the closest ranks of sorted
// (numpy's default), p in [0, 100].
func Percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := p / 100 * float64(len(sorted)-1)
	lo := int(math.Floor(rank))
	hi := int(math.Ceil(rank))
	if hi >= len(sorted) {
		hi = len(sorted) - 1
	}
	frac := rank - float64(lo)
	return sorted[lo] + (sorted[hi]-sorted[lo])*frac
}
