package router

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Each limit ends the attempt with its own cause, whichever passes first.
func TestLegClock(t *testing.T) {
	errEnd, errFirst, errIdle := errors.New("end"), errors.New("first"), errors.New("idle")
	const short, long = 30 * time.Millisecond, 10 * time.Second
	for _, tc := range []struct {
		name string
		run  func(k *legClock)
		want error
	}{
		{"end alone", func(*legClock) {}, errEnd},
		{"first event late", func(k *legClock) { k.firstEventWithin(short, errFirst) }, errFirst},
		{"first event sent, then idle", func(k *legClock) {
			k.firstEventWithin(short, errFirst)
			k.idleWithin(3*short, errIdle)
			k.firstEventSent()
		}, errIdle},
		{"reads keep it alive until the end", func(k *legClock) {
			k.idleWithin(4*short, errIdle)
			for range 8 {
				time.Sleep(short / 2)
				k.read()
			}
		}, errEnd},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancelCause(context.Background())
			defer cancel(nil)
			end := long
			if tc.want == errEnd {
				end = 5 * short
			}
			k := newLegClock(cancel, end, errEnd)
			defer k.stop()
			tc.run(k)
			select {
			case <-ctx.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("no limit fired")
			}
			require.ErrorIs(t, context.Cause(ctx), tc.want)
		})
	}
	t.Run("stopped: nothing fires", func(t *testing.T) {
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		k := newLegClock(cancel, short, errEnd)
		k.stop()
		time.Sleep(3 * short)
		require.NoError(t, ctx.Err())
	})
}
