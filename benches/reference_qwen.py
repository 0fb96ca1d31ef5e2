#!/usr/bin/env python3
"""tokens/s of transformers' Qwen3Model on torch (f32 and bf16) at BATCH inputs of TOKENS tokens,
last-token pooled and normalized as Qwen3-Embedding does, beside family-bench's figures for the
same model dir; and the process's RSS after load and at peak.
Usage: reference_qwen.py --model-dir DIR [--tokens 128] [--batch 32] [--rounds 2]"""
import argparse
import json
import resource
import time

import torch
from transformers import Qwen3Model

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", required=True)
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--dtypes", default="float32,bfloat16")
args = ap.parse_args()
torch.set_num_threads(2)


def rss_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
    return 0


ids = torch.randint(1000, 20000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
for name in args.dtypes.split(","):
    dtype = getattr(torch, name)
    model = Qwen3Model.from_pretrained(args.model_dir, dtype=dtype).eval()
    loaded = rss_mib("VmRSS:")
    with torch.inference_mode():
        model(input_ids=ids[:1, :8], attention_mask=mask[:1, :8])  # warm-up
        started = time.perf_counter()
        for _ in range(args.rounds):
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            vectors = torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1)
        seconds = time.perf_counter() - started
    print(json.dumps({
        "engine": f"transformers-torch-{name}", "batch": args.batch, "tokens_per_input": args.tokens,
        "tokens_per_s": args.rounds * args.batch * args.tokens / seconds, "seconds": seconds,
        "rss_after_load_mib": loaded, "peak_rss_mib": rss_mib("VmHWM:"),
    }), flush=True)
    del model
