#!/usr/bin/env python3
"""Recomputes vLLM's prefix-cache block hashes from the prompt token ids and
compares them with the `request.block_hashes` ProbeConnector logged.

vLLM 0.32 with the default `prefix_caching_hash_algo=sha256`:
    NONE_HASH  = sha256(pickle.dumps(seed, protocol=5))
                 seed = $PYTHONHASHSEED if set, else the fixed "vllm-none-hash"
    block[i]   = sha256(pickle.dumps((block[i-1] or NONE_HASH,
                                      tuple(token_ids[i*bs:(i+1)*bs]),
                                      extra_keys), protocol=5))
with extra_keys None when there is no LoRA, multimodal input or cache_salt.
So with sha256 the hashes are reproducible across processes even when
PYTHONHASHSEED is unset (only the xxhash variants use a random seed then).

    python verify_block_hashes.py PROBE_LOG DUMP_DIR [--seed 0] [--block-size 32]

Exit 0 when every logged request with a dump matched (and at least one did).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys


def sha(x: object) -> bytes:
    return hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("probe_log")
    ap.add_argument("dump_dir")
    ap.add_argument("--seed", default=os.environ.get("PYTHONHASHSEED", "vllm-none-hash"))
    ap.add_argument("--block-size", type=int, default=32)
    args = ap.parse_args(argv)
    import torch

    none_hash = sha(args.seed)
    ok = bad = 0
    for line in open(args.probe_log, encoding="utf-8"):
        r = json.loads(line)
        if r.get("method") != "get_num_new_matched_tokens" or not r.get("num_block_hashes"):
            continue
        f = os.path.join(args.dump_dir, f"{r['request_id']}.pt")
        if not os.path.exists(f):
            continue
        ids = torch.load(f)["prompt_token_ids"]
        bs = args.block_size
        h1 = sha((none_hash, tuple(ids[:bs]), None))
        h2 = sha((h1, tuple(ids[bs : 2 * bs]), None))
        good = h1.hex() == r["block_hash_first_hex"] and (
            r.get("block_hash_second_hex") is None or h2.hex() == r["block_hash_second_hex"]
        )
        ok += good
        bad += not good
    print(json.dumps({"block_hashes_matched": ok, "mismatched": bad, "seed": args.seed}))
    return 0 if ok and not bad else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
