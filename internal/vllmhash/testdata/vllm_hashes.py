"""Block hashes as vLLM itself computes them, for vllm_test.go.

Reads JSON cases from stdin: [{"algo", "seed" (null: PYTHONHASHSEED unset),
"block_size", "tokens", "salt" (null: none)}], and prints one JSON list per
case: NONE_HASH then every block hash, in hex. Each case goes through
vLLM's own init_none_hash and a real Request with vLLM's block hasher.
"""
import json
import os
import sys

from vllm import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
from vllm.v1.request import Request


def main() -> None:
    out = []
    for i, case in enumerate(json.load(sys.stdin)):
        if case["seed"] is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = case["seed"]
        fn = get_hash_fn_by_name(case["algo"])
        kv_cache_utils.init_none_hash(fn)
        hasher = kv_cache_utils.get_request_block_hasher(case["block_size"], fn)
        req = Request(f"r{i}", case["tokens"], SamplingParams(max_tokens=1), None,
                      cache_salt=case["salt"], block_hasher=hasher)
        out.append([bytes(kv_cache_utils.NONE_HASH).hex()] + [bytes(h).hex() for h in req.block_hashes])
    json.dump(out, sys.stdout)


main()
