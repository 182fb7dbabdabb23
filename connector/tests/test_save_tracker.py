"""SaveTracker alone (no engine, no harness): when a delayed free is
reported, what a timed-out preemption wait gives up, and its invariants
under random interleavings of vLLM's calls and the save thread's."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pegaflow_connector.metrics import Metrics
from pegaflow_connector.save_tracker import SaveTracker


class Handle:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def test_delayed_request_without_saves_is_reported_at_once_and_once() -> None:
    t = SaveTracker()
    t.delay_free(["a"])
    assert t.finished(["a"]) == {"a"}
    assert t.finished(["a"]) == set()
    t.check()


def test_delayed_request_is_reported_after_its_last_save() -> None:
    t = SaveTracker()
    t.queue(["a", "b"])
    t.queue(["a"])
    t.delay_free(["a"])
    assert t.finished(["a"]) == set(), "two saves of a still queued"
    t.job_done(["a", "b"])
    assert t.finished([]) == set(), "one save of a still queued"
    t.job_done(["a"])
    t.check()
    assert t.finished([]) == {"a"}
    assert t.finished(["a"]) == set()
    assert not t.busy()
    t.check()


def test_request_vllm_does_not_delay_is_never_reported() -> None:
    t = SaveTracker()
    t.queue(["a"])
    assert t.finished(["a"]) == set()
    t.job_done(["a"])
    assert t.finished(["a"]) == set()
    t.check()


def test_wait_without_saves_returns_at_once() -> None:
    m = Metrics()
    t = SaveTracker(m)
    t.queue(["other"])
    assert t.wait(["a"], 0)
    assert m.get("preemption_waits") == 0 and m.get("preemption_wait_timeouts") == 0


def test_timed_out_wait_gives_up_queued_and_in_flight_saves_only() -> None:
    m = Metrics()
    t = SaveTracker(m)
    old = t.queue(["a", "b"])
    running, other = Handle(), Handle()
    with t.track(running, ["a"], old), t.track(other, ["b"], old):
        assert not t.wait(["a"], 0)
        assert running.cancelled == 1, "a's call in flight is cancelled"
        assert other.cancelled == 0, "b was not given up"
        t.check()
    assert t.given_up(old) == {"a"}
    late = Handle()
    with t.track(late, ["a", "b"], old):
        assert late.cancelled == 1, "a call of a given-up job is cancelled at once"
    new = t.queue(["a"])
    assert t.given_up(new) == set(), "saves queued after the wait go ahead"
    fresh = Handle()
    with t.track(fresh, ["a"], new):
        assert fresh.cancelled == 0
    assert m.get("preemption_waits") == 1 and m.get("preemption_wait_timeouts") == 1
    assert m.get("preempted_saves_cancelled") == 1
    t.job_done(["a", "b"])
    t.job_done(["a"])
    assert t.given_up(old) == set(), "nothing is given up once a's saves ended"
    t.check()


def test_wait_returns_when_the_save_thread_finishes() -> None:
    m = Metrics()
    t = SaveTracker(m)
    t.queue(["a"])
    go = threading.Event()

    def save_thread() -> None:
        go.wait(30)
        t.job_done(["a"])

    th = threading.Thread(target=save_thread)
    th.start()
    go.set()
    try:
        assert t.wait(["a"], 30)
        assert t.wait_idle(time.monotonic() + 30)
    finally:
        th.join(30)
    assert m.get("preemption_wait_timeouts") == 0
    assert t.given_up(1) == set()


def test_wait_idle_times_out_while_saving() -> None:
    t = SaveTracker()
    t.queue(["a"])
    assert not t.wait_idle(0)
    t.job_done(["a"])
    assert t.wait_idle(0)


def test_check_catches_a_broken_invariant() -> None:
    t = SaveTracker()
    t.delay_free(["a"])
    t._waiting.add("a")  # waiting, but delayed too and without saves
    with pytest.raises(AssertionError):
        t.check()


@pytest.mark.parametrize("seed", range(20))
def test_random_interleavings_keep_the_invariants(seed: int) -> None:
    """vLLM's order for one request: saves queued over steps, then
    possibly a delayed free and its finish; the save thread ends jobs in
    queue order; preemption waits time out at random. Each delayed request
    is reported exactly once, and only after its last save ended."""
    rng = random.Random(seed)
    t = SaveTracker()
    jobs: list[tuple[int, set[str]]] = []  # queued, oldest first
    saving: dict[str, int] = {}  # the model's pending count
    delayed: set[str] = set()
    finished: set[str] = set()
    reported: list[str] = []
    live = [f"r{i}" for i in range(6)]
    for _ in range(300):
        op = rng.randrange(5)
        if op == 0 and live:
            rids = set(rng.sample(live, rng.randint(1, min(3, len(live)))))
            seq = t.queue(rids)
            assert not jobs or seq > jobs[-1][0]
            jobs.append((seq, rids))
            for r in rids:
                saving[r] = saving.get(r, 0) + 1
        elif op == 1 and jobs:
            seq, rids = jobs.pop(0)
            dropped = t.given_up(seq)
            assert dropped <= rids | set(saving)
            t.job_done(rids)
            for r in rids:
                saving[r] -= 1
                if not saving[r]:
                    del saving[r]
        elif op == 2 and live:
            r = rng.choice(live)
            live.remove(r)
            if rng.random() < 0.7:
                t.delay_free([r])
                delayed.add(r)
            got = t.finished([r])
            finished.add(r)
            reported.extend(got)
        elif op == 3:
            reported.extend(t.finished([]))
        elif op == 4 and saving:
            r = rng.choice(sorted(saving))
            assert not t.wait([r], 0)
        t.check()
        for r in reported:
            assert r in delayed and r in finished and r not in saving, r
        if not live:
            live = [f"r{seed}-{i}-{rng.random()}" for i in range(6)]
    while jobs:
        t.job_done(jobs.pop(0)[1])
    reported.extend(t.finished([]))
    t.check()
    assert sorted(reported) == sorted(delayed & finished), "each delayed request once"
    assert not t.busy()
