package bench

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// progress reports completed requests: a redrawn bar on a terminal, a line
// every few seconds (and at the end) anywhere else.
type progress struct {
	w        io.Writer
	tty      bool
	total    int
	start    time.Time
	mu       sync.Mutex
	ok, fail int
	quit     chan struct{}
	finished chan struct{}
	once     sync.Once
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func newProgress(w io.Writer, total int) *progress {
	p := &progress{w: w, total: total, start: time.Now(), quit: make(chan struct{}), finished: make(chan struct{})}
	if w == nil {
		close(p.finished)
		return p
	}
	p.tty = isTerminal(w)
	every := 5 * time.Second
	if p.tty {
		every = 200 * time.Millisecond
	}
	go func() {
		defer close(p.finished)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.draw(false)
			case <-p.quit:
				p.draw(true)
				return
			}
		}
	}()
	return p
}

func (p *progress) done(ok bool) {
	p.mu.Lock()
	if ok {
		p.ok++
	} else {
		p.fail++
	}
	p.mu.Unlock()
}

func (p *progress) stop() {
	p.once.Do(func() { close(p.quit) })
	<-p.finished
}

func (p *progress) draw(final bool) {
	p.mu.Lock()
	ok, fail := p.ok, p.fail
	p.mu.Unlock()
	n := ok + fail
	el := time.Since(p.start).Truncate(100 * time.Millisecond)
	rate := 0.0
	if s := time.Since(p.start).Seconds(); s > 0 {
		rate = float64(n) / s
	}
	if !p.tty {
		fmt.Fprintf(p.w, "bench: %d/%d requests done, %d failed, %s elapsed, %.2f req/s\n", n, p.total, fail, el, rate)
		return
	}
	const width = 30
	filled := 0
	if p.total > 0 {
		filled = n * width / p.total
	}
	bar := strings.Repeat("█", filled) + strings.Repeat("░", width-filled)
	fmt.Fprintf(p.w, "\r%s %d/%d  failed %d  %s  %.2f req/s ", bar, n, p.total, fail, el, rate)
	if final {
		fmt.Fprintln(p.w)
	}
}
