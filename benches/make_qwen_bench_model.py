#!/usr/bin/env python3
"""A random-weight decoder embedder with Qwen3-Embedding-0.6B's shape (28 layers, hidden 1024,
16 query / 8 key-value heads of 128, SwiGLU 3072, per-head q/k RMSNorm, rope theta 1e6), saved by
transformers' Qwen3Model in bfloat16 as the released checkpoint is, for speed and memory benches
only. The vocabulary is the tiny Qwen3 fixture's tokenizer's (30,528 ids instead of 151,669: it
changes memory, not speed), whose tokenizer.json is copied beside it.
Usage: make_qwen_bench_model.py OUT [TOKENIZER_DIR]"""
import pathlib
import shutil
import sys

import torch
from transformers import Qwen3Config, Qwen3Model

out = pathlib.Path(sys.argv[1])
tok = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/models/tiny-qwen3")
if not (out / "config.json").exists():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=30528, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    model = Qwen3Model(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tok / name).exists():
            shutil.copy(tok / name, out / name)
print(out)
