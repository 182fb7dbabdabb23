package bench

import (
	"flag"
	"io"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/cli"
)

func TestFlags(t *testing.T) {
	parse := func(args []string, env map[string]string) (Config, error) {
		cfg := DefaultConfig()
		fs := flag.NewFlagSet("bench", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		BindFlags(fs, &cfg)
		err := cli.Parse(fs, args, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
		return cfg, err
	}
	cfg, err := parse(nil, nil)
	require.NoError(t, err)
	require.True(t, math.IsInf(cfg.RequestRate, 1))
	require.Equal(t, []float64{99}, cfg.Percentiles)

	cfg, err = parse([]string{"--request-rate", "2.5", "--percentiles", "50, 90,99.9", "--max-concurrency", "4",
		"--endpoint", EndpointChat, "--timeout", "3s", "--ignore-eos=false"}, map[string]string{"PEGAFLOW_NUM_PROMPTS": "7", "PEGAFLOW_REQUEST_RATE": "9"})
	require.NoError(t, err)
	require.Equal(t, 2.5, cfg.RequestRate, "command line wins over the environment")
	require.Equal(t, 7, cfg.NumPrompts, "environment fills what the command line left")
	require.Equal(t, []float64{50, 90, 99.9}, cfg.Percentiles)
	require.Equal(t, 4, cfg.MaxConcurrency)
	require.Equal(t, 3*time.Second, cfg.Timeout)
	require.False(t, cfg.IgnoreEOS)
	require.NoError(t, cfg.Validate())

	cfg, err = parse([]string{"--request-rate", "INF"}, nil)
	require.NoError(t, err)
	require.True(t, math.IsInf(cfg.RequestRate, 1))

	for _, bad := range [][]string{{"--request-rate", "0"}, {"--request-rate", "fast"}, {"--percentiles", "0"}, {"--percentiles", "50,x"}, {"--percentiles", ""}} {
		_, err := parse(bad, nil)
		require.Error(t, err, "%v", bad)
	}
}
