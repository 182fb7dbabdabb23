#!/usr/bin/env python3
"""Metric snapshots and the checks of pd_check.sh (standard library only).

    pd_eval.py snap OUT.json engine=URL router=URL p=URL d=URL ...
    pd_eval.py check PHASE --before B.json --after A.json --compare CMP.json \
        --model MODEL_DIR [--block-size 32] [--stopped]

`snap` stores every sample of each server's /metrics (a server that does
not answer is stored as absent: the stopped engine). `check` prints the
deltas between two snapshots next to what the prompt set implies and exits
1 when a check fails. The expectations, for a P/D pass of N cases:

- every case token-identical to the reference (compare_outputs' JSON);
- D computed only the tails: each prompt of T tokens has (T - 1) // bs
  loadable blocks (vLLM always computes the last prompt token), so D's
  `local_compute` tokens equal the sum of the tails, and every other prompt
  token came from the engine (`external_kv_transfer`) or from D's own prefix
  cache (`local_cache_hit`, a prompt D saw before);
- the engine delivered exactly those external tokens
  (`loaded_bytes_total` = external blocks x bytes per block);
- one transfer per case settled `ready`, and the router got one `/kv_ready`
  callback per case before its decode leg (no KV-ready timeout).

With --stopped (the engine was killed during the pass) the outputs must
still be identical, every request must succeed, and the cases after the
kill must have been recomputed by D (KV-ready waits timed out instead of
hanging; D's local_compute exceeds the tails).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from typing import Any

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def value(snap: dict[str, Any], server: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    samples = snap.get(server) or {}
    total = 0.0
    for key, v in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if all(got.get(k) == want for k, want in labels.items()):
            total += v
    return total


class Checker:
    def __init__(self, phase: str, tag: str | None = None) -> None:
        self.tag = tag or f"pd:{phase}"
        self.failed = 0

    def line(self, msg: str) -> None:
        print(f"[{self.tag}] {msg}", flush=True)

    def expect(self, ok: bool, msg: str) -> None:
        self.line(f"{'ok  ' if ok else 'FAIL'} {msg}")
        if not ok:
            self.failed += 1


def block_bytes(model_dir: str, block_size: int) -> int:
    with open(f"{model_dir}/config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    # float32 K and V of every layer (the vLLM-CPU tensor: heads x bs x 2*head per layer).
    return int(cfg["num_hidden_layers"]) * heads * block_size * 2 * head * 4


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check(args: argparse.Namespace) -> int:
    before, after, results = (load_json(f) for f in (args.before, args.after, args.compare))
    c = Checker(args.phase)
    bs = args.block_size

    def d(server: str, name: str, **labels: str) -> float:
        return value(after, server, name, **labels) - value(before, server, name, **labels)

    n = len(results)
    ok = sum(1 for r in results if r["ok"])
    c.expect(n > 0 and ok == n, f"outputs token-identical to the reference: {ok} of {n} cases")
    prompt = [int(r["usage"]["prompt_tokens"]) for r in results if r.get("usage")]
    c.expect(len(prompt) == n, f"prompt token counts known for {len(prompt)} of {n} cases")
    loadable = sum((t - 1) // bs * bs for t in prompt)
    tails = sum(prompt) - loadable
    src = {s: d("d", "vllm:prompt_tokens_by_source_total", source=s)
           for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    psrc = {s: d("p", "vllm:prompt_tokens_by_source_total", source=s)
            for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    c.line(f"prompt tokens {sum(prompt)} in {n} cases: loadable (full blocks before the last "
           f"token) {loadable}, tails {tails}")
    c.line("D prompt tokens by source: " + " ".join(f"{k}={int(v)}" for k, v in src.items()))
    c.line("P prompt tokens by source: " + " ".join(f"{k}={int(v)}" for k, v in psrc.items()))
    ext_hits = d("d", "vllm:external_prefix_cache_hits_total")
    ext_q = d("d", "vllm:external_prefix_cache_queries_total")
    c.line(f"D external prefix cache: {int(ext_hits)} hits of {int(ext_q)} queried tokens")
    bb = block_bytes(args.model, bs)
    eng = {k: d("engine", f"pegaflow_engine_{k}") for k in
           ("hits_total", "misses_total", "saves_total", "loads_total", "saved_bytes_total",
            "loaded_bytes_total", "save_failures_total")}
    ready = d("engine", "pegaflow_engine_transfers_total", status="ready")
    tfail = d("engine", "pegaflow_engine_transfers_total", status="failed")
    if after.get("engine") is None:
        c.line("engine: down (no metrics after the pass)")
    else:
        c.line("engine: " + " ".join(f"{k}={int(v)}" for k, v in eng.items())
               + f" transfers ready={int(ready)} failed={int(tfail)} (block {bb} bytes)")
    cb = d("router", "pegaflow_router_kv_ready_total", source="callback")
    from_engine = d("router", "pegaflow_router_kv_ready_total", source="engine")
    timeouts = d("router", "pegaflow_router_kv_ready_timeouts_total")
    waits = d("router", "pegaflow_router_phase_seconds_count", phase="kv_ready_wait")
    wait_s = d("router", "pegaflow_router_phase_seconds_sum", phase="kv_ready_wait")
    req_ok = d("router", "pegaflow_router_requests_total", outcome="ok")
    req_bad = sum(d("router", "pegaflow_router_requests_total", outcome=o)
                  for o in ("failed", "client_cancelled", "rejected"))
    c.line(f"router: requests ok={int(req_ok)} other={int(req_bad)}; kv_ready waits={int(waits)} "
           f"(mean {1000 * wait_s / max(waits, 1):.1f} ms) ready by callback={int(cb)} "
           f"by engine={int(from_engine)} timeouts={int(timeouts)}")
    phases = []
    for ph in ("prefill", "kv_ready_wait", "decode_first_byte", "ttft", "e2e"):
        cnt = d("router", "pegaflow_router_phase_seconds_count", phase=ph)
        tot = d("router", "pegaflow_router_phase_seconds_sum", phase=ph)
        phases.append(f"{ph} {1000 * tot / cnt:.1f}" if cnt else f"{ph} -")
    c.line("router phase means (ms): " + ", ".join(phases))
    cand = [float(r.get("cand_s") or 0) for r in results]
    refs = [float(r.get("ref_s") or 0) for r in results]
    c.line(f"latency per case: P/D max {max(cand, default=0):.2f} s, total {sum(cand):.1f} s; "
           f"reference max {max(refs, default=0):.2f} s, total {sum(refs):.1f} s")
    c.expect(req_ok == n and req_bad == 0, f"router: {int(req_ok)} of {n} requests ok, "
             f"{int(req_bad)} not")
    c.expect(waits == n, f"router: a KV-ready wait before each of the {n} decode legs "
             f"({int(waits)})")

    if not args.stopped:
        c.expect(src["local_compute"] == tails,
                 f"D computed only the tails: local_compute {int(src['local_compute'])} == {tails}")
        c.expect(src["external_kv_transfer"] > 0 and
                 src["external_kv_transfer"] + src["local_cache_hit"] == loadable,
                 f"D got every loadable token from the engine or its own cache: external "
                 f"{int(src['external_kv_transfer'])} + local hit {int(src['local_cache_hit'])} "
                 f"== {loadable}")
        ext_blocks = (src["external_kv_transfer"] + psrc["external_kv_transfer"]) // bs
        c.expect(eng["loaded_bytes_total"] == ext_blocks * bb and eng["loads_total"] == ext_blocks,
                 f"engine delivered exactly the external blocks: {int(eng['loads_total'])} loads, "
                 f"{int(eng['loaded_bytes_total'])} bytes == {int(ext_blocks)} x {bb}")
        c.expect(eng["hits_total"] >= ext_blocks, f"engine hits {int(eng['hits_total'])} >= "
                 f"{int(ext_blocks)} loaded blocks")
        # The connector's own stats, as vLLM exposes them (KVConnectorStats
        # -> build_prom_metrics): D's hits are exactly vLLM's external tokens.
        pf = {k: d(s_, f"vllm:pegaflow_{k}_total") for s_, k in
              (("d", "hit_tokens"), ("d", "blocks_loaded"), ("d", "bytes_loaded"),
               ("d", "load_calls"), ("p", "blocks_saved"), ("p", "bytes_saved"))}
        c.line("vLLM /metrics (PegaFlow): D " + " ".join(
            f"{k}={int(pf[k])}" for k in ("hit_tokens", "blocks_loaded", "bytes_loaded", "load_calls"))
            + f"; P blocks_saved={int(pf['blocks_saved'])} bytes_saved={int(pf['bytes_saved'])}")
        d_blocks = src["external_kv_transfer"] // bs
        c.expect(pf["hit_tokens"] == src["external_kv_transfer"] and
                 pf["blocks_loaded"] == d_blocks and pf["bytes_loaded"] == d_blocks * bb,
                 f"vLLM's /metrics shows the connector's stats: D hit_tokens {int(pf['hit_tokens'])}"
                 f" == external {int(src['external_kv_transfer'])}, blocks_loaded "
                 f"{int(pf['blocks_loaded'])} == {int(d_blocks)}, bytes_loaded == blocks x {bb}")
        c.expect(pf["blocks_saved"] > 0 and pf["bytes_saved"] == pf["blocks_saved"] * bb,
                 f"vLLM's /metrics on P: blocks_saved {int(pf['blocks_saved'])} > 0, bytes_saved "
                 f"== blocks x {bb}")
        c.expect(ready == n and tfail == 0, f"engine: {int(ready)} transfers ready, "
                 f"{int(tfail)} failed (want {n}, 0)")
        c.expect(cb == n and timeouts == 0,
                 f"router: every decode leg followed a /kv_ready callback ({int(cb)} of {n}), "
                 f"{int(timeouts)} timeouts")
    else:
        gone = after.get("engine") is None
        c.expect(gone, "engine is down after the pass" if gone else "engine still answers")
        # kv_ready_timeouts_total counts expired waits and `failed` reports
        # alike (P's connector reports failed when its saves were dropped).
        c.expect(timeouts >= 1, f"router: KV-ready waits after the stop ended without a ready "
                 f"report ({int(timeouts)}: timeout or failed report), decode went on")
        c.expect(cb + timeouts == n, f"router: every wait ended by a ready callback ({int(cb)}) "
                 f"or not ready ({int(timeouts)}), {n} in all")
        c.expect(src["local_compute"] > tails,
                 f"D recomputed prompts after the stop: local_compute {int(src['local_compute'])} "
                 f"> tails {tails}")
        limit = args.kv_ready_timeout + 30
        c.expect(max(cand, default=0) < limit, f"no hang: slowest case "
                 f"{max(cand, default=0):.2f} s < {limit:.0f} s (KV-ready timeout + 30 s)")
    c.line(f"{'PASS' if c.failed == 0 else 'FAIL'} ({c.failed} failed checks)")
    return 0 if c.failed == 0 else 1


def disabled(url: str) -> int:
    """Phase 4: a D whose connector could not start says so in vLLM's own
    /metrics (vllm:pegaflow_disabled_total) and claimed no hit."""
    snap = {"d": scrape(url)}
    dis = value(snap, "d", "vllm:pegaflow_disabled_total")
    hit = value(snap, "d", "vllm:pegaflow_hit_tokens_total")
    ok = dis >= 1 and hit == 0
    print(f"[pd]   D /metrics: pegaflow_disabled_total={dis:.0f} pegaflow_hit_tokens_total="
          f"{hit:.0f} -> {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def hybrid(args: argparse.Namespace) -> int:
    """A hybrid model's P/D pass (hybrid_check.sh, pd_check.sh phase 5):
    every case token-identical to the reference, and D's external hit tokens
    (vLLM's own count: vllm:prompt_tokens_by_source_total with source
    external_kv_transfer, set from the tokens the connector's
    get_num_new_matched_tokens claimed and the scheduler accepted) at least
    --min-hit-pct of all prompt tokens, with no load failure."""
    before, after, results = (load_json(f) for f in (args.before, args.after, args.compare))
    c = Checker(args.phase, tag=args.phase)

    def d(server: str, name: str, **labels: str) -> float:
        return value(after, server, name, **labels) - value(before, server, name, **labels)

    n = len(results)
    ok = sum(1 for r in results if r["ok"])
    prompt = sum(int(r["usage"]["prompt_tokens"]) for r in results if r.get("usage"))
    ext = d("d", "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    local = d("d", "vllm:prompt_tokens_by_source_total", source="local_cache_hit")
    pct = 100.0 * ext / prompt if prompt else 0.0
    print(f"[{args.phase}] model {args.label}: {ok}/{n} identical, D external hit tokens {int(ext)} "
          f"of {prompt} prompt tokens ({pct:.0f}%)", flush=True)
    saved = d("p", "vllm:pegaflow_blocks_saved_total")
    loaded = d("d", "vllm:pegaflow_blocks_loaded_total")
    failed = d("d", "vllm:pegaflow_load_failed_blocks_total")
    req_ok = d("router", "pegaflow_router_requests_total", outcome="ok")
    c.line(f"D local cache hit tokens {int(local)}; P blocks saved {int(saved)}, D blocks loaded "
           f"{int(loaded)}, load failures {int(failed)}; router requests ok {int(req_ok)}")
    c.expect(n > 0 and ok == n, f"outputs token-identical to the reference: {ok} of {n} cases")
    c.expect(req_ok == n, f"router: {int(req_ok)} of {n} requests ok")
    c.expect(pct >= args.min_hit_pct, f"D's external hit tokens {pct:.0f}% of the prompt tokens "
             f">= {args.min_hit_pct:g}%")
    c.expect(failed == 0, f"D: no block failed to load ({int(failed)})")
    hit = d("d", "vllm:pegaflow_hit_tokens_total")
    c.expect(hit == ext and (ext == 0 or loaded > 0),
             f"the connector's own stats agree: D hit_tokens {int(hit)} == external {int(ext)}, "
             f"blocks loaded {int(loaded)}")
    c.line(f"{'PASS' if c.failed == 0 else 'FAIL'} ({c.failed} failed checks)")
    return 0 if c.failed == 0 else 1


def corrupt(args: argparse.Namespace) -> int:
    """The corruption case: a poisoner P saved blocks that are wrong in one
    KV cache group, then the same prompts went to D directly. Either D
    refused the hit (no external tokens) or the outputs it gave from the
    poisoned blocks differ from the reference: all of them but at most one
    in eight (a greedy sequence of a few dozen tokens may survive a
    perturbed state, as a real model's would). Mostly identical outputs
    with external tokens mean the corrupted group was never loaded (or
    was loaded and not used): a wrong-output bug in waiting."""
    before, after, results = (load_json(f) for f in (args.before, args.after, args.compare))
    c = Checker(args.phase, tag=args.phase)
    ext = value(after, "d", "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") - \
        value(before, "d", "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    n = len(results)
    same = sum(1 for r in results if r["ok"])
    answered = sum(1 for r in results if r.get("usage"))
    print(f"[{args.phase}] model {args.label} corruption (last layer's group poisoned): D external "
          f"hit tokens {int(ext)}, {n - same} of {n} outputs differ from the reference", flush=True)
    c.expect(answered == n, f"every case answered ({answered} of {n})")
    if ext == 0:
        c.line("ok   D refused the hit (no external tokens): nothing wrong was served")
        # The engine cannot tell poisoned bytes from good ones (same hashes,
        # every group present), so a connector that serves hybrids loads
        # them: a refusal here means the load path was not exercised.
        if args.min_hit_pct > 0:
            c.expect(False, "the case exercised D's load path (external tokens > 0; only "
                     "--min-hit-pct 0 accepts a refusal)")
    else:
        c.expect(same * 8 <= n, f"the outputs from the poisoned blocks differ: {n - same} of {n} "
                 f"(at most one in eight may survive)")
    c.line(f"{'PASS' if c.failed == 0 else 'FAIL'} ({c.failed} failed checks)")
    return 0 if c.failed == 0 else 1


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snap")
    s.add_argument("out")
    s.add_argument("servers", nargs="+", help="name=URL")
    k = sub.add_parser("check")
    k.add_argument("phase")
    k.add_argument("--before", required=True)
    k.add_argument("--after", required=True)
    k.add_argument("--compare", required=True)
    k.add_argument("--model", required=True)
    k.add_argument("--block-size", type=int, default=32)
    k.add_argument("--stopped", action="store_true")
    k.add_argument("--kv-ready-timeout", type=float, default=5.0, help="router's, seconds")
    x = sub.add_parser("disabled")
    x.add_argument("url")
    for cmd in ("hybrid", "corrupt"):
        h = sub.add_parser(cmd)
        h.add_argument("phase")
        h.add_argument("label", help="the model's name in the phase line")
        h.add_argument("--before", required=True)
        h.add_argument("--after", required=True)
        h.add_argument("--compare", required=True)
        h.add_argument("--min-hit-pct", type=float, default=50.0)
    args = ap.parse_args(argv)
    if args.cmd == "disabled":
        return disabled(args.url)
    if args.cmd == "hybrid":
        return hybrid(args)
    if args.cmd == "corrupt":
        return corrupt(args)
    if args.cmd == "snap":
        snap = {}
        for item in args.servers:
            name, _, url = item.partition("=")
            snap[name] = scrape(url)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(snap, f)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
