#!/usr/bin/env python3
"""Sends one fixed prompt set to a reference and a candidate OpenAI endpoint
and checks the greedy outputs are token-for-token identical.

The prompt set covers /v1/completions and /v1/chat/completions, streaming
and not, and prompt lengths from under one block to many blocks (lengths in
tokens of the tiny model's tokenizer, approximately). Every request asks for
`temperature: 0`, `ignore_eos: true` (so every output is max_tokens long) and
`return_token_ids: true` (so token ids, not only text, are compared).

    python compare_outputs.py --ref http://127.0.0.1:8300 --cand http://127.0.0.1:8000 \
        [--model /tmp/tiny-model] [--max-tokens 24] [--json out.json] \
        [--lengths 200,450,900 --distinct] [--no-chat]

--lengths replaces the prompt lengths (words); --distinct gives every case
its own words, so that no case is a prefix-cache hit of an earlier one except
the two shared-prefix cases (hybrid_check.sh counts external hits against
every prompt token).

Prints one line per case and a closing 'N passed, N failed' line; exit 0 only
when every case matched. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

WORDS = (
    "block cache key value tensor layer head token prompt prefill decode engine router "
    "worker scheduler alpha beta gamma delta river mountain forest ocean city bridge "
    "one two three four five red green blue north south"
).split()

# Approximate prompt lengths in words; about one token per word with the tiny
# model's tokenizer, so 5 is under one 32-token block and 1400 is ~44 blocks.
LENGTHS = (5, 31, 33, 64, 100, 257, 600, 1400)


@dataclass
class Case:
    name: str
    path: str
    body: dict[str, Any]
    stream: bool


def prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def cases(model: str, max_tokens: int, variant: int = 0, lengths: tuple[int, ...] = LENGTHS,
          distinct: bool = False, chat: bool = True) -> list[Case]:
    """The fixed prompt set; another `variant` gives the same shapes with
    different words (prompts no earlier pass left in any prefix cache)."""
    out: list[Case] = []
    v = 10000 * variant
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    for i, n in enumerate(lengths):
        p = prompt(n, v + 100 + i)
        for stream in (False, True):
            if distinct:
                p = prompt(n, v + 100 + i + 50 * stream + 5000)
            body = dict(common, prompt=p, stream=stream)
            if stream:
                body["stream_options"] = {"include_usage": True}
            out.append(Case(f"cmpl-{n}w-{'stream' if stream else 'full'}", "/v1/completions", body, stream))
        msgs = [
            {"role": "system", "content": prompt(8, v + 200 + i)},
            {"role": "user", "content": p},
        ]
        for stream in (False, True) if chat else ():
            if distinct:
                msgs = [
                    {"role": "system", "content": prompt(8, v + 200 + i + 50 * stream + 5000)},
                    {"role": "user", "content": prompt(n, v + 300 + i + 50 * stream + 5000)},
                ]
            body = dict(common, messages=msgs, stream=stream)
            if stream:
                body["stream_options"] = {"include_usage": True}
            out.append(Case(f"chat-{n}w-{'stream' if stream else 'full'}", "/v1/chat/completions", body, stream))
    # A shared long prefix with different tails: prefix reuse must not change outputs.
    base = prompt(300, v + 999)
    for j in range(2):
        body = dict(common, prompt=base + " " + prompt(20, v + 1000 + j), stream=False)
        out.append(Case(f"cmpl-shared-prefix-{j}", "/v1/completions", body, False))
    return out


def post(url: str, body: dict[str, Any], stream: bool, timeout: float) -> dict[str, Any]:
    """Returns {"text", "token_ids", "usage", "kv_transfer_params"}."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if not stream:
            d = json.loads(resp.read())
            ch = d["choices"][0]
            text = ch.get("text")
            if text is None:
                text = (ch.get("message") or {}).get("content")
            return {
                "text": text,
                "token_ids": ch.get("token_ids"),
                "usage": d.get("usage"),
                "kv_transfer_params": d.get("kv_transfer_params"),
            }
        text, ids, usage, done = [], [], None, False
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                # Read on to the end of the stream, as the OpenAI SDK does:
                # closing at [DONE] races the proxy's own end of the relay.
                done = True
                continue
            if done:
                raise RuntimeError("data after [DONE]")
            d = json.loads(data)
            if d.get("usage"):
                usage = d["usage"]
            for ch in d.get("choices", []):
                t = ch.get("text")
                if t is None:
                    t = (ch.get("delta") or {}).get("content")
                if t:
                    text.append(t)
                if ch.get("token_ids"):
                    ids.extend(ch["token_ids"])
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        return {"text": "".join(text), "token_ids": ids or None, "usage": usage, "kv_transfer_params": None}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="reference base URL (plain vLLM)")
    ap.add_argument("--cand", required=True, help="candidate base URL (router / P-D)")
    ap.add_argument("--model", default="/tmp/tiny-model")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument("--json", help="write per-case results here")
    ap.add_argument("--variant", type=int, default=0, help="prompt set variant (0: the default set)")
    ap.add_argument("--lengths", help="prompt lengths in words, comma-separated (default "
                    + ",".join(map(str, LENGTHS)) + ")")
    ap.add_argument("--distinct", action="store_true", help="no case repeats another's prompt")
    ap.add_argument("--no-chat", action="store_true",
                    help="completions only (gpt-oss: vLLM renders its chats as Harmony, whose "
                    "special tokens a tiny vocabulary lacks)")
    args = ap.parse_args(argv)
    try:
        lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else LENGTHS
    except ValueError:
        ap.error(f"--lengths: not a comma-separated list of integers: {args.lengths!r}")
    if not lengths or min(lengths) < 1:
        ap.error("--lengths: each length must be >= 1")

    passed = failed = 0
    results = []
    for c in cases(args.model, args.max_tokens, args.variant, lengths, args.distinct, not args.no_chat):
        rec: dict[str, Any] = {"case": c.name}
        try:
            t0 = time.monotonic()
            ref = post(args.ref.rstrip("/") + c.path, c.body, c.stream, args.timeout)
            t1 = time.monotonic()
            cand = post(args.cand.rstrip("/") + c.path, c.body, c.stream, args.timeout)
            t2 = time.monotonic()
            rec.update(ref_s=round(t1 - t0, 3), cand_s=round(t2 - t1, 3), usage=ref["usage"])
            problems = []
            if ref["token_ids"] is None or cand["token_ids"] is None:
                problems.append("token ids missing")
            elif ref["token_ids"] != cand["token_ids"]:
                pairs = zip(ref["token_ids"], cand["token_ids"], strict=False)
                k = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
                n_ref, n_cand = len(ref["token_ids"]), len(cand["token_ids"])
                problems.append(f"token ids differ (first at {k}; ref {n_ref} cand {n_cand})")
            if ref["text"] != cand["text"]:
                problems.append("text differs")
            if ref["token_ids"] is not None and len(ref["token_ids"]) != args.max_tokens:
                problems.append(f"reference produced {len(ref['token_ids'])} tokens, want {args.max_tokens}")
            rec["ok"] = not problems
            rec["problems"] = problems
        except (urllib.error.URLError, OSError, RuntimeError, ValueError, KeyError) as e:
            rec["ok"] = False
            rec["problems"] = [f"{type(e).__name__}: {e}"]
        results.append(rec)
        if rec["ok"]:
            passed += 1
        else:
            failed += 1
        print(f"{'ok  ' if rec['ok'] else 'FAIL'} {c.name} cand {rec.get('cand_s', '-')} s "
              f"{'; '.join(rec['problems'])}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
