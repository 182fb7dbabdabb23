package bench

import (
	"math"
	"math/rand/v2"
	"time"
)

// Arrivals returns the send time of each of n requests as an offset from the
// start, following vLLM's `bench serve`: with rate +Inf every request starts
// at once; otherwise the gaps are gamma-distributed with shape burstiness and
// mean 1/rate, so burstiness 1 is a Poisson process and the gaps' coefficient
// of variation is 1/sqrt(burstiness).
func Arrivals(n int, rate, burstiness float64, seed int64) []time.Duration {
	out := make([]time.Duration, n)
	if math.IsInf(rate, 1) || n == 0 {
		return out
	}
	r := rand.New(rand.NewPCG(uint64(seed), 0xa771_7a15))
	theta := 1 / (rate * burstiness)
	var t float64
	for i := 1; i < n; i++ {
		t += gammaSample(r, burstiness, theta)
		out[i] = time.Duration(t * float64(time.Second))
	}
	return out
}

// gammaSample draws from Gamma(shape, scale) by Marsaglia and Tsang's method
// (shape >= 1), boosted by U^(1/shape) for shape < 1.
func gammaSample(r *rand.Rand, shape, scale float64) float64 {
	if shape < 1 {
		return gammaSample(r, shape+1, scale) * math.Pow(r.Float64(), 1/shape)
	}
	d := shape - 1.0/3
	c := 1 / math.Sqrt(9*d)
	for {
		x := r.NormFloat64()
		v := 1 + c*x
		if v <= 0 {
			continue
		}
		v = v * v * v
		u := r.Float64()
		if u < 1-0.0331*x*x*x*x || math.Log(u) < 0.5*x*x+d*(1-v+math.Log(v)) {
			return d * v * scale
		}
	}
}
