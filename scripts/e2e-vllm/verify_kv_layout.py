#!/usr/bin/env python3
"""Checks which bytes of vLLM-CPU's KV tensor hold which token's K and V.

Input: the `<req>.pt` files ProbeConnector writes with $PROBE_DUMP_DIR (the
raw per-layer tensors of a request's blocks right after its prefill, and its
prompt token ids). The same prompt is run through Hugging Face transformers;
its per-layer K (after RoPE) and V are compared with two readings of the
vLLM tensor [num_blocks, num_kv_heads, block_size, 2*head_size]:

  split_rows:    per (block, head) block_size K rows then block_size V rows
                 (how vLLM's CPU attention views it, see kv_views)
  split_channel: per token the first head_size channels K, the rest V

  kT_v_rows:     per (block, head) K transposed ([head_size, block_size],
                 channel-major) then V as block_size rows of head_size:
                 what vLLM 0.32's "vec" CPU attention ISA (x86 AVX2/AVX-512
                 without AMX) actually writes

and prints the max abs difference of each, per layer, as JSON. Exit 0 when
one reading matches (max diff < 1e-3) for every layer and dump; the
matching readings are listed under "matches".

    python verify_kv_layout.py MODEL_DIR DUMP_DIR
"""

from __future__ import annotations

import glob
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, dump_dir = argv
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    files = sorted(glob.glob(os.path.join(dump_dir, "*.pt")))
    if not files:
        print(f"no dumps in {dump_dir}", file=sys.stderr)
        return 2
    matches: set[str] | None = None
    for f in files:
        d = torch.load(f)
        ids = torch.tensor([d["prompt_token_ids"]])
        with torch.no_grad():
            out = model(ids, use_cache=True)
        cache = out.past_key_values
        n_tok = ids.shape[1]
        report: dict[str, dict[str, float]] = {}
        for li, (name, blocks) in enumerate(d["layers"].items()):
            hf_k = cache.layers[li].keys[0]  # [H, seq, C]
            hf_v = cache.layers[li].values[0]
            nb, h, bs, c2 = blocks.shape
            c = c2 // 2
            rows_k, rows_v = blocks.view(nb, h, 2 * bs, c).chunk(2, dim=2)
            chan_k, chan_v = blocks[..., :c], blocks[..., c:]
            # K^T: the first bs*c values of a (block, head) are K[c][n].
            kt_k = blocks.reshape(nb, h, 2 * bs * c)[..., : bs * c].reshape(nb, h, c, bs).transpose(2, 3)
            readings = {
                "split_rows": (rows_k, rows_v),
                "split_channel": (chan_k, chan_v),
                "kT_v_rows": (kt_k, rows_v),
            }
            diffs = {k: 0.0 for k in readings}
            for bi in range(nb):
                lo, hi = bi * bs, min((bi + 1) * bs, n_tok)
                if lo >= hi:
                    break
                ref_k, ref_v = hf_k[:, lo:hi], hf_v[:, lo:hi]
                for key, (kk, vv) in readings.items():
                    dk = (kk[bi, :, : hi - lo] - ref_k).abs().max().item()
                    dv = (vv[bi, :, : hi - lo] - ref_v).abs().max().item()
                    diffs[key] = max(diffs[key], dk, dv)
            report[name] = diffs
            matching = {k for k, v in diffs.items() if v < 1e-3}
            matches = matching if matches is None else matches & matching
        print(json.dumps({"dump": os.path.basename(f), "prompt_tokens": n_tok, "max_abs_diff": report}))
    print(json.dumps({"matches": sorted(matches or [])}))
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
