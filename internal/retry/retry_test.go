package retry

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestDelay(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Policy
		n    int
		want time.Duration
	}{
		{"no backoff", Policy{}, 1, 0},
		{"first", Policy{Backoff: 10 * time.Millisecond, NoJitter: true}, 1, 10 * time.Millisecond},
		{"doubles", Policy{Backoff: 10 * time.Millisecond, NoJitter: true}, 3, 40 * time.Millisecond},
		{"factor 4", Policy{Backoff: 50 * time.Millisecond, Factor: 4, NoJitter: true}, 3, 800 * time.Millisecond},
		{"capped", Policy{Backoff: 10 * time.Millisecond, BackoffMax: 25 * time.Millisecond, NoJitter: true}, 5, 25 * time.Millisecond},
		{"n 0", Policy{Backoff: time.Second}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, tc.p.Delay(tc.n))
		})
	}
	p := Policy{Backoff: 100 * time.Millisecond}
	for range 100 {
		d := p.Delay(1)
		require.GreaterOrEqual(t, d, 50*time.Millisecond)
		require.LessOrEqual(t, d, 100*time.Millisecond)
	}
}

func TestDo(t *testing.T) {
	boom := errors.New("boom")
	fatal := errors.New("fatal")
	for _, tc := range []struct {
		name      string
		attempts  int
		fails     int // op fails this many times, then succeeds
		err       error
		retryable func(error) bool
		wantCalls int
		wantErr   error
	}{
		{"first try", 3, 0, boom, nil, 1, nil},
		{"succeeds on third", 3, 2, boom, nil, 3, nil},
		{"runs out", 3, 10, boom, nil, 3, boom},
		{"not retryable", 3, 10, fatal, func(err error) bool { return !errors.Is(err, fatal) }, 1, fatal},
		{"permanent", 3, 10, Permanent(fatal), nil, 1, fatal},
		{"zero attempts means one", 0, 10, boom, nil, 1, boom},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			err := Do(context.Background(), Policy{Attempts: tc.attempts}, tc.retryable, func(_ context.Context, attempt int) error {
				calls++
				require.Equal(t, calls, attempt)
				if calls <= tc.fails {
					return tc.err
				}
				return nil
			})
			require.Equal(t, tc.wantCalls, calls)
			if tc.wantErr == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tc.wantErr)
			require.False(t, IsPermanent(err), "the mark does not leak to the caller")
		})
	}
}

func TestDoStopsWhenContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	boom := errors.New("boom")
	calls := 0
	start := time.Now()
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	err := Do(ctx, Policy{Attempts: 5, Backoff: time.Hour}, nil, func(context.Context, int) error {
		calls++
		return boom
	})
	require.Less(t, time.Since(start), time.Minute)
	require.Equal(t, 1, calls)
	require.ErrorIs(t, err, context.Canceled)
	require.ErrorIs(t, err, boom)

	require.ErrorIs(t, Do(ctx, Policy{}, nil, func(context.Context, int) error { return nil }), context.Canceled)
}
