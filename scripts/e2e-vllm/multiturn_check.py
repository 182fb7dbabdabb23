#!/usr/bin/env python3
"""Multi-turn reuse through the answer, with the real vLLM (pd_check.sh).

Turn 1 goes through the router (P prefills, D decodes); turn 2's prompt is
turn 1's prompt + its answer + a new message, as a chat client sends it.
D is kv_both and saves the blocks it decodes (save_decode_blocks), so
turn 2's prefill on P loads from the engine the blocks that cover the
answer, which P never computed. Checks (standard library only):

- both turns token-identical to the plain vLLM reference;
- turn 2's prefill on P got every full block of turn 1's prompt + answer
  (as D computed them: all but the last sampled token) from its own prefix
  cache or the engine, and the engine supplied the blocks past turn 1's
  prompt (P's vLLM /metrics, prompt_tokens_by_source_total).

Prompts are token ids (from the reference's /tokenize), so turn 2 extends
turn 1's tokens exactly: no re-tokenisation at the seams.

    multiturn_check.py --router URL --ref URL --p URL --model M [--block-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from compare_outputs import prompt  # noqa: E402
from pd_eval import scrape, value  # noqa: E402


def post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def complete(base: str, model: str, ids: list[int], max_tokens: int) -> list[int]:
    d = post(base + "/v1/completions", {"model": model, "prompt": ids, "max_tokens": max_tokens,
                                        "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    return list(d["choices"][0]["token_ids"])


def sources(p_url: str) -> dict[str, float]:
    snap = {"p": scrape(p_url)}
    return {s: value(snap, "p", "vllm:prompt_tokens_by_source_total", source=s)
            for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--p", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=80)
    a = ap.parse_args()
    bs = a.block_size
    ok = True

    def expect(cond: bool, msg: str) -> None:
        nonlocal ok
        ok &= cond
        print(f"[pd]   {'ok' if cond else 'FAIL'} multi-turn: {msg}")

    tok = post(a.ref + "/tokenize", {"model": a.model, "prompt": prompt(60, 777001)})["tokens"]
    new_msg = post(a.ref + "/tokenize", {"model": a.model, "prompt": " " + prompt(12, 777002),
                                         "add_special_tokens": False})["tokens"]
    turn1 = list(tok)
    answer = complete(a.router, a.model, turn1, a.answer_tokens)
    ref_answer = complete(a.ref, a.model, turn1, a.answer_tokens)
    expect(answer == ref_answer, f"turn 1 ({len(turn1)} prompt tokens) identical to the reference")
    time.sleep(1)  # D's last decode-block saves settle (they end before its blocks are freed)
    turn2 = turn1 + answer + new_msg
    before = sources(a.p)
    out2 = complete(a.router, a.model, turn2, 16)
    after = sources(a.p)
    expect(out2 == complete(a.ref, a.model, turn2, 16),
           f"turn 2 ({len(turn2)} prompt tokens: turn 1 + answer + {len(new_msg)}) identical to the reference")
    got = {k: int(after[k] - before[k]) for k in after}
    # D computed every token of turn 1 but the last one sampled.
    covered = (len(turn1) + len(answer) - 1) // bs * bs
    print(f"[pd]   turn 2 on P, prompt tokens by source: {got}; turn 1 prompt {len(turn1)}, "
          f"prompt + answer blocks {covered}")
    expect(got["local_cache_hit"] + got["external_kv_transfer"] >= covered,
           f"P's prefill reused every full block of turn 1's prompt + answer "
           f"({got['local_cache_hit']} local + {got['external_kv_transfer']} engine >= {covered})")
    past_prompt = covered - len(turn1) // bs * bs
    expect(got["external_kv_transfer"] >= past_prompt,
           f"the engine supplied the answer's blocks, which only D computed "
           f"({got['external_kv_transfer']} >= {past_prompt} tokens past turn 1's full prompt blocks)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
