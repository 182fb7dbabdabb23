#!/usr/bin/env python3
"""Builds a tiny random-weight Llama model and a locally trained tokenizer.

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

    python make_tiny_model.py OUT_DIR [--check]
"""

from __future__ import annotations

import argparse
import json
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


def check(out: Path) -> None:
    """Prints the greedy margin (top-1 minus top-2 logit) over sample prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    rng = random.Random(7)
    gaps = []
    for n in (8, 40, 130, 300):
        text = " ".join(rng.choice(WORDS) for _ in range(n))
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0]
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
    ap.add_argument("--check", action="store_true", help="print the greedy logit margin")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.out)
    build_model(args.out, tok)
    print(f"tiny model written to {args.out} (vocab {len(tok)})")
    if args.check:
        check(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
