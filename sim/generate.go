package sim

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/labstack/echo/v4"
)

func (s *Sim) fail(c echo.Context, err error) error {
	code := http.StatusInternalServerError
	var he *httpError
	if errors.As(err, &he) {
		code = he.code
	} else if errors.Is(err, errShutdown) {
		code = http.StatusServiceUnavailable
	}
	s.m.requestErrors.WithLabelValues(fmt.Sprint(code)).Inc()
	if c.Response().Committed {
		return nil
	}
	return writeError(c, code, err.Error())
}

func (s *Sim) serveGenerate(c echo.Context, chat bool) error {
	arrival := time.Now()
	p, err := s.parse(c, chat)
	if err != nil {
		return s.fail(c, err)
	}
	ctx := c.Request().Context()
	bs := s.cfg.Geometry.BlockSize
	q := newSeq(p.prompt, p.maxTokens, Digest(p.prompt, p.seed), bs, prefixStart(s.noneHash))
	q.arrival = arrival
	s.m.promptTokens.Add(float64(len(p.prompt)))

	var loadedTokens int
	var respParams map[string]any
	if p.role != rolePrefill && s.savesAll() {
		s.saveSealed(q, p) // P saves its prompt's blocks, its whole KV, below
	}
	if p.role == roleDecode || s.loadsPrefix() {
		if loadedTokens, err = s.loadRemote(ctx, q, p, p.role == roleDecode); err != nil {
			return s.fail(c, err)
		}
	}
	if p.role == rolePrefill {
		respParams = s.preparePrefill(q, p)
	}
	if err := s.submit(ctx, q); err != nil {
		s.pool.release(q.blocks)
		return s.fail(c, err)
	}
	stop := context.AfterFunc(ctx, func() {
		q.cancelled.Store(true)
		select {
		case s.wake <- struct{}{}:
		default:
		}
	})
	defer stop()

	w := newWriter(c, p, s.cfg.Model)
	if p.stream {
		w.start()
	}
	var toks []token
	for {
		more, done, err := q.next(ctx, len(toks))
		if err != nil {
			if ctx.Err() != nil {
				return nil // the client left; the scheduler drops the request
			}
			if p.stream {
				s.m.requestErrors.WithLabelValues("500").Inc()
				w.streamError(err)
				return nil
			}
			return s.fail(c, err)
		}
		if p.stream {
			for i, t := range more {
				w.chunk(t.text, done && i == len(more)-1)
			}
		}
		toks = append(toks, more...)
		if done {
			break
		}
	}
	s.observe(arrival, toks)
	u := usage{Prompt: len(p.prompt), Completion: len(toks), Cached: loadedTokens}
	if p.stream {
		w.finish(u)
		return nil
	}
	var text strings.Builder
	for _, t := range toks {
		text.WriteString(t.text)
	}
	return w.whole(text.String(), u, respParams)
}

func (s *Sim) submit(ctx context.Context, q *seq) error {
	select {
	case s.sched.in <- q:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-s.lifeCtx.Done():
		return errShutdown
	}
}

func (s *Sim) observe(arrival time.Time, toks []token) {
	if len(toks) == 0 {
		return
	}
	s.m.ttft.Observe(toks[0].at.Sub(arrival).Seconds())
	for i := 1; i < len(toks); i++ {
		s.m.itl.Observe(toks[i].at.Sub(toks[i-1].at).Seconds())
	}
	s.m.e2e.Observe(toks[len(toks)-1].at.Sub(arrival).Seconds())
	s.m.success.WithLabelValues("length").Inc()
}
