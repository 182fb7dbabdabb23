package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pegaflow/pegaflow/engine/ssd"
	"github.com/pegaflow/pegaflow/native"
)

// A directory of the SSD tier (ssdtier.go): its checks (ownership, mode),
// its size classes (the classes file) and its store's opening, reopening
// with a new class, and closing.

// checkSSDDir creates path 0700 when missing and insists it is a
// directory (not a link) owned by this process's user and closed to
// everyone else: the slot files hold every tenant's KV.
func checkSSDDir(path string) error {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("%s is not a directory (symbolic links are refused)", path)
	case ok && int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s is owned by uid %d, not this engine's %d", path, st.Uid, os.Geteuid())
	case fi.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("%s has mode %v; want 0700 (the slot files hold every tenant's KV)", path, fi.Mode().Perm())
	}
	return nil
}

// readClasses reads a directory's size classes; none when the file is
// absent.
func readClasses(dir string) ([]uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, classesFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if len(b) > 4096 {
		return nil, fmt.Errorf("%s: %d bytes", classesFile, len(b))
	}
	var out []uint64
	for _, f := range strings.Fields(string(b)) {
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil || n == 0 || n%ssdAlign != 0 || n > 1<<36 {
			return nil, fmt.Errorf("%s: bad size %q", classesFile, f)
		}
		out = append(out, n)
	}
	slices.Sort(out)
	out = slices.Compact(out)
	if len(out) > maxSSDClasses {
		return nil, fmt.Errorf("%s: %d classes, max %d", classesFile, len(out), maxSSDClasses)
	}
	return out, nil
}

func writeClasses(dir string, classes []uint64) error {
	var b strings.Builder
	for _, c := range classes {
		fmt.Fprintln(&b, c)
	}
	tmp := filepath.Join(dir, classesFile+".tmp")
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, classesFile))
}

// openStore opens d's store with classes, splitting the directory's
// space equally between them, and the native files. Caller holds
// d.ioMu exclusively or is alone (New).
func (t *ssdTier) openStore(d *ssdDir, classes []uint64) error {
	per := t.cfg.Size / uint64(len(classes))
	var cs []ssd.Class
	for _, c := range classes {
		slots := per / (ssd.HeaderSize + c)
		if slots == 0 {
			continue
		}
		cs = append(cs, ssd.Class{MaxPayload: c, Slots: int(slots)})
	}
	if len(cs) == 0 {
		return fmt.Errorf("%d bytes hold no slot of %d bytes", per, classes[0])
	}
	start := time.Now()
	st, err := ssd.Open(t.ctx, ssd.Config{Dir: d.path, Classes: cs, Logger: t.log})
	if err != nil {
		return err
	}
	var files []*native.SSDFile
	for _, fi := range st.Files() {
		f, err := native.OpenSSDFile(fi.Path, fi.Size, false, false)
		if err != nil {
			for _, f := range files {
				_ = f.Close()
			}
			_ = st.Close(t.ctx)
			return fmt.Errorf("open %s: %w", fi.Path, err)
		}
		if !f.Direct() {
			t.log.Warn("ssd: the file system refuses O_DIRECT; using buffered I/O", "file", fi.Path)
		}
		files = append(files, f)
	}
	d.store, d.files, d.classes = st, files, classes
	d.recovery = time.Since(start)
	s := st.Stats()
	d.recovered = s.Live
	t.log.Info("ssd: directory open", "dir", d.path, "classes", classes, "slots", s.Slots, "blocks", s.Live,
		"from_checkpoint", s.RecoveredFromCkpt, "by_scan", s.RecoveredByScan, "dropped", s.RecoveryDroppedSlot,
		"recovery", d.recovery)
	return nil
}

// closeStore checkpoints and closes d's store and files. Caller holds
// d.ioMu exclusively (no I/O on them runs).
func (t *ssdTier) closeStore(d *ssdDir) error {
	if d.store == nil {
		return nil
	}
	// A context of its own: Close's checkpoint must run after t.ctx ends.
	err := d.store.Close(context.Background())
	for _, f := range d.files {
		err = errors.Join(err, f.Close())
	}
	d.store, d.files = nil, nil
	return err
}

// learn is told the payload size of a group's blocks when a namespace
// registers (under e.mu: it only starts the work). A size no class of a
// directory fits is added as a class, reopening the directory in the
// background (its other classes keep their blocks, within their new,
// smaller share of the space).
func (t *ssdTier) learn(payload uint64) {
	t.mu.Lock()
	seen := t.learned[payload]
	if len(t.learned) < 4*maxSSDClasses {
		t.learned[payload] = true
	}
	t.mu.Unlock()
	if seen || payload == 0 {
		return
	}
	for _, d := range t.dirs {
		t.mu.Lock()
		usable := d.usable
		t.mu.Unlock()
		if !usable {
			continue
		}
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			t.addClass(d, payload)
		}()
	}
}

func (t *ssdTier) addClass(d *ssdDir, payload uint64) {
	// Shared first: a class the directory has (a restart reopened it) must
	// not take the lock that promotes only try.
	d.ioMu.RLock()
	have := slices.Contains(d.classes, payload)
	d.ioMu.RUnlock()
	if have {
		return
	}
	d.ioMu.Lock()
	defer d.ioMu.Unlock()
	if t.ctx.Err() != nil || slices.Contains(d.classes, payload) {
		return
	}
	if len(d.classes) >= maxSSDClasses {
		t.log.Warn("ssd: no class for a new block size: the directory has the most classes", "dir", d.path, "bytes", payload)
		return
	}
	classes := append(slices.Clone(d.classes), payload)
	slices.Sort(classes)
	err := t.closeStore(d)
	if err == nil {
		err = writeClasses(d.path, classes)
	}
	if err == nil {
		err = t.openStore(d, classes)
	}
	if err != nil {
		t.log.Error("ssd: directory left out", "dir", d.path, "err", err)
		t.mu.Lock()
		d.usable = false
		t.mu.Unlock()
	}
}
