"""Multi-turn reuse through the answer: a kv_both D saves the blocks it
decodes (save_decode_blocks), so the next turn, whose prompt is the
previous prompt + the answer + a new message, loads the answer's KV too."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from harness import CacheSpec, Engine, Instance, ReadyServer, expected_block, per_group
from test_pd import decode_params, pd_params, prompt, run_prefill

BS = 16


@pytest.mark.parametrize("save_decode", [True, False])
def test_next_turn_loads_the_previous_answer(engine: Engine, ready_server: ReadyServer,
                                             save_decode: bool) -> None:
    cache = CacheSpec("flash_attn")
    p = Instance(engine, name="p", tp=1, cache=cache, kv_role="kv_producer")
    d = Instance(engine, name="d", tp=1, cache=cache, kv_role="kv_both",
                 extra={"save_decode_blocks": save_decode})
    q = Instance(engine, name="q", tp=1, cache=cache, kv_role="kv_both")  # turn 2's prefill
    try:
        for inst in (p, d, q):
            inst.handshake()
        turn1 = prompt(BS * 9 + 5, 7)
        params = run_prefill(p, "t1-p", turn1, pd_params(ready_server, uuid.uuid4().hex))
        answer_len = BS * 3 + 4
        r1 = d.add_request("t1-d", turn1, max_tokens=answer_len, kv_transfer_params=decode_params(params))
        d.run()
        assert r1.load_done_computed == 9 * BS
        assert len(r1.output_token_ids) == answer_len
        assert d.flush()
        # D computed every token but the last sampled one: 200 tokens, 12
        # full blocks, 3 of them past the prompt (block 9 holds its tail).
        history = turn1 + r1.output_token_ids
        full = (len(history) - 1) // BS
        assert full == 12
        turn2 = history + prompt(20, 8)
        r2 = q.add_request("t2", turn2)
        assert r2.block_hashes[:full] == r1.block_hashes[:full], "turn 2 chains through the answer"
        q.run()
        want = full if save_decode else 9
        assert r2.load_done_computed == want * BS, "blocks loaded by turn 2"
        got = q.read_blocks(0, per_group(cache, q.last_blocks["t2"])[0][:want])
        for i in range(want):
            exp = expected_block(cache, 1, 0, turn2, i)
            for layer in range(cache.num_layers):
                assert np.array_equal(got[i][layer], exp[layer]), (i, layer)
    finally:
        for inst in (p, d, q):
            inst.close()
