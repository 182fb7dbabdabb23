"""KV events of the CPU tier (kv_events.py): the tracker against a fake
feed, then an instance against the real engine, and (where vLLM's venv is
there) the events published by vLLM's own ZMQ publisher and decoded with
its own classes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import Future
from typing import Any

import pytest
from conftest import engine_binary
from harness import CacheSpec, Engine, Instance

from pegaflow_connector._proto import engine_pb2 as pb
from pegaflow_connector.client import EngineUnavailable
from pegaflow_connector.compat import vllm_kv_events
from pegaflow_connector.kv_events import Cleared, KVEventsTracker, Removed, Stored
from pegaflow_connector.metrics import Metrics

ST, PR, RM = pb.BLOCK_EVENT_KIND_STORED, pb.BLOCK_EVENT_KIND_PRESENT, pb.BLOCK_EVENT_KIND_REMOVED
BS = 4


class FakeFeed:
    """The engine's BlockEvents, scripted: each call answers the next
    queued reply (or an empty one)."""

    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.calls: list[pb.BlockEventsRequest] = []
        self.metrics = Metrics()

    def push(self, events: list[tuple[int, int, bytes]], next_: int = 0, gap: bool = False,
             restarted: bool = False, epoch: str = "ep-1") -> None:
        self.replies.append(pb.BlockEventsResponse(
            events=[pb.BlockEvent(seq=i + 1, kind=k, group=g, hash=h) for i, (k, g, h) in enumerate(events)],
            next=next_, gap=gap, restarted=restarted, epoch=epoch))

    def block_events(self, req: pb.BlockEventsRequest, timeout_s: float) -> pb.BlockEventsResponse:
        self.calls.append(req)
        r = self.replies.pop(0) if self.replies else pb.BlockEventsResponse(next=req.after, epoch="ep-1")
        if isinstance(r, Exception):
            raise r
        return r

    def warn_limited(self, *a: Any, **k: Any) -> None:
        return


def run_now(fn: Any, *args: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(fn(*args))
    return f


def tracker(feed: FakeFeed, **kw: Any) -> KVEventsTracker:
    t = iter(range(10**6))
    return KVEventsTracker(feed, feed.metrics, block_size=BS, submit=run_now,  # type: ignore[arg-type]
                           namespace_id=lambda: "ns-1", clock=lambda: float(next(t)), **kw)


def h(i: int) -> bytes:
    return bytes([i]) * 32


def note_chain(tr: KVEventsTracker, n: int, first: int = 0, group: int = 0) -> None:
    """Blocks first..first+n-1 of one request (block i's tokens 10i..10i+3)."""
    for i in range(first, first + n):
        tr.note(group, h(i), h(i - 1) if i else None, [10 * i + j for j in range(BS)])


def drain(tr: KVEventsTracker) -> list[Any]:
    """Two takes: the first applies the queued reply, the second the next."""
    return tr.take() + tr.take()


def test_saved_blocks_are_advertised_with_tokens_and_withdrawn_when_evicted() -> None:
    feed = FakeFeed()
    tr = tracker(feed)
    note_chain(tr, 3)
    tr.take()  # first poll: starts the feed now
    assert feed.calls[0].epoch == "" and feed.calls[0].namespace_id == "ns-1"
    feed.push([(ST, 0, h(0)), (ST, 0, h(1)), (ST, 0, h(9)), (ST, 0, h(2)), (RM, 0, h(8))], next_=5)
    got = drain(tr)
    # h(9) and h(8) are not this instance's: neither advertised nor
    # withdrawn; the chain 0-1-2 is one BlockStored.
    assert got == [Stored(0, None, [h(0), h(1), h(2)], [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23])]
    assert feed.calls[-1].after == 5 and feed.calls[-1].epoch == "ep-1"
    feed.push([(RM, 0, h(1)), (PR, 0, h(0)), (RM, 0, h(0))], next_=8)
    assert drain(tr) == [Removed(0, [h(1), h(0)])]
    assert feed.metrics.get("kv_events_stored_blocks") == 3
    assert feed.metrics.get("kv_events_removed_blocks") == 2


def test_present_advertises_a_block_sealed_before_its_tokens_were_known() -> None:
    """A block another instance saved: this one learns its tokens when it
    loads it (the engine then says present), and advertises it once."""
    feed = FakeFeed()
    tr = tracker(feed)
    tr.take()
    feed.push([(ST, 0, h(0))])  # sealed by someone else, tokens unknown here
    drain(tr)
    note_chain(tr, 1)
    feed.push([(PR, 0, h(0)), (PR, 0, h(0)), (ST, 0, h(0))])
    assert drain(tr) == [Stored(0, None, [h(0)], [0, 1, 2, 3])]


def test_a_removal_then_a_store_of_the_same_block_stay_in_order() -> None:
    feed = FakeFeed()
    tr = tracker(feed)
    note_chain(tr, 1)
    tr.take()
    feed.push([(ST, 0, h(0)), (RM, 0, h(0))])
    note_chain(tr, 1)  # saved again before the next poll
    assert drain(tr) == [Stored(0, None, [h(0)], [0, 1, 2, 3]), Removed(0, [h(0)])]
    feed.push([(ST, 0, h(0))])
    assert drain(tr) == [Stored(0, None, [h(0)], [0, 1, 2, 3])]


@pytest.mark.parametrize("why", ["gap", "restarted"])
def test_lost_events_withdraw_everything_advertised(why: str) -> None:
    feed = FakeFeed()
    tr = tracker(feed)
    note_chain(tr, 2)
    note_chain(tr, 1, first=5, group=1)
    tr.take()
    feed.push([(ST, 0, h(0)), (ST, 0, h(1)), (ST, 1, h(5))])
    drain(tr)
    feed.push([], gap=why == "gap", restarted=why == "restarted", epoch="ep-2")
    got = drain(tr)
    assert [type(e) for e in got] == [Removed, Removed]
    assert sorted(got[0].hashes) == [h(0), h(1)] and got[1] == Removed(1, [h(5)])
    assert feed.metrics.get("kv_events_resyncs") == 1
    assert feed.calls[-1].epoch == "ep-2"
    feed.push([(RM, 0, h(0))])
    assert drain(tr) == [], "nothing is withdrawn twice"


def test_more_blocks_than_tracked_resync_as_all_cleared() -> None:
    feed = FakeFeed()
    tr = tracker(feed, advertised_cap=1)
    note_chain(tr, 2)
    tr.take()
    feed.push([(ST, 0, h(0)), (ST, 0, h(1))])
    assert len(drain(tr)[0].hashes) == 2
    assert feed.metrics.get("kv_events_untracked") == 1
    feed.push([], gap=True)
    assert drain(tr) == [Cleared()]


def test_the_book_is_bounded() -> None:
    feed = FakeFeed()
    tr = tracker(feed, book_cap=2)
    note_chain(tr, 3)
    assert feed.metrics.get("kv_events_book_dropped") == 1
    tr.take()
    feed.push([(ST, 0, h(0)), (ST, 0, h(1)), (ST, 0, h(2))])
    assert drain(tr) == [Stored(0, h(0), [h(1), h(2)], [10, 11, 12, 13, 20, 21, 22, 23])]


def test_an_unreachable_engine_is_counted_and_changes_nothing() -> None:
    feed = FakeFeed()
    tr = tracker(feed)
    note_chain(tr, 1)
    tr.take()
    feed.push([(ST, 0, h(0))], next_=1)
    drain(tr)
    feed.replies.append(EngineUnavailable("gone", "BlockEvents"))
    assert drain(tr) == []
    assert feed.metrics.get("kv_events_poll_failures") == 1
    assert feed.calls[-1].after == 1 and feed.calls[-1].epoch == "ep-1", "the cursor is kept"


def test_stop_withdraws_and_then_publishes_nothing() -> None:
    feed = FakeFeed()
    tr = tracker(feed)
    note_chain(tr, 1)
    tr.take()
    feed.push([(ST, 0, h(0))])
    drain(tr)
    tr.stop("disabled")
    assert tr.take() == [Removed(0, [h(0)])]
    calls = len(feed.calls)
    note_chain(tr, 2)
    assert drain(tr) == [] and len(feed.calls) == calls


def test_vllm_kv_events_shapes() -> None:
    """The stand-in classes (no vLLM here) get vLLM's field names."""
    out = vllm_kv_events([Stored(1, h(0), [h(1)], [1, 2, 3, 4]), Removed(1, [h(1)]), Cleared()], BS,
                         convert=lambda b: b[:2])
    st, rm, cl = out
    assert (st.block_hashes, st.parent_block_hash, st.token_ids, st.block_size, st.medium, st.group_idx) == \
        ([h(1)[:2]], h(0)[:2], [1, 2, 3, 4], BS, "CPU", 1)
    assert (rm.block_hashes, rm.medium, rm.group_idx) == ([h(1)[:2]], "CPU", 1)
    assert type(cl).__name__ == "AllBlocksCleared"


# ------------------------------------------------ against the real engine

VENV = os.environ.get("E2E_VLLM_VENV", "/tmp/vllm-venv")
DECODE = os.path.join(os.path.dirname(__file__), "kv_events_vllm.py")


def _events_until(inst: Instance, pred: Any, timeout_s: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while not pred(got):
        assert time.monotonic() < deadline, f"no such events: {got}"
        got += inst.connector._sched.take_events()
        time.sleep(0.03)
    return got


def test_instance_publishes_what_the_engine_holds_and_evicts(workdir: str) -> None:
    """An instance saves a prompt (advertised, with its tokens and parent
    chain), then a second prompt evicts most of it from a small pool
    (withdrawn). With vLLM's venv: the same events through vLLM's ZMQ
    publisher, decoded with vLLM's classes."""
    eng = Engine(engine_binary(), workdir, pool="1MiB")  # 32 blocks of 32 KiB
    eng.start()
    cache = CacheSpec("flash_attn")
    p = Instance(eng, name="p", tp=1, cache=cache)
    try:
        p.handshake()
        p.connector._sched.enable_kv_events()
        deadline = time.monotonic() + 10
        while not p.connector._sched.events._epoch:  # the first poll starts the feed
            assert time.monotonic() < deadline, "the engine's feed never answered"
            p.connector.take_events()
            time.sleep(0.03)
        first = list(range(1000, 1000 + 16 * 20 + 3))
        r1 = p.add_request("a", first)
        p.run()
        assert p.flush()
        stored = _events_until(p, lambda ev: sum(len(e.hashes) for e in ev if isinstance(e, Stored)) >= 20)
        assert all(isinstance(e, Stored) for e in stored)
        hashes = [x for e in stored for x in e.hashes]
        assert hashes == r1.block_hashes[:20]
        assert stored[0].parent is None and stored[0].token_ids[:16] == first[:16]
        assert [t for e in stored for t in e.token_ids] == first[:320]
        second = list(range(5000, 5000 + 16 * 24 + 1))
        p.add_request("b", second)
        p.run()
        assert p.flush()
        later = _events_until(p, lambda ev: any(isinstance(e, Removed) for e in ev) and
                              sum(len(e.hashes) for e in ev if isinstance(e, Stored)) >= 24)
        removed = [x for e in later if isinstance(e, Removed) for x in e.hashes]
        assert removed and set(removed) <= set(hashes)
        assert p.connector.metrics.get("kv_events_removed_blocks") == len(removed)
        py = os.path.join(VENV, "bin", "python")
        if not os.access(py, os.X_OK) or subprocess.run(
                [py, "-c", "import vllm.distributed.kv_events, zmq, msgspec"], capture_output=True,
                timeout=120).returncode != 0:
            pytest.skip(f"no usable vLLM venv at {VENV}: vLLM's publisher and classes not checked")
        batch = [{"stored": isinstance(e, Stored), "group": e.group, "hashes": [x.hex() for x in e.hashes],
                  "parent": e.parent.hex() if isinstance(e, Stored) and e.parent else None,
                  "tokens": e.token_ids if isinstance(e, Stored) else None} for e in stored + later]
        src = os.path.join(os.path.dirname(__file__), "..", "src")
        out = subprocess.run([py, DECODE, str(cache.block_size)],
                             input=json.dumps(batch), capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": src})
        assert out.returncode == 0, out.stderr[-3000:]
        decoded = json.loads(out.stdout)
        conv = [int.from_bytes(x[-8:], "big") for x in hashes]  # vLLM's int event hashes
        got_st = [x for e in decoded if e["type"] == "BlockStored" for x in e["block_hashes"]]
        assert got_st[:20] == conv
        assert all(e["medium"] == "CPU" and e["block_size"] == 16 and e["group_idx"] == 0
                   for e in decoded if e["type"] == "BlockStored")
        assert decoded[0]["parent_block_hash"] is None and decoded[0]["token_ids"][:16] == first[:16]
        got_rm = [x for e in decoded if e["type"] == "BlockRemoved" for x in e["block_hashes"]]
        assert got_rm == [int.from_bytes(x[-8:], "big") for x in removed]
    finally:
        p.close()
        eng.stop()
