#!/usr/bin/env python3
"""transformers reference for the rerank bench: one query x N documents per call (one padded
batch, only_second truncation), sequential calls, p50/p95 latency and pairs/s."""
import argparse
import json
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", required=True)
ap.add_argument("--documents", required=True)
ap.add_argument("--docs", type=int, default=100)
ap.add_argument("--requests", type=int, default=20)
a = ap.parse_args()
docs = [l for l in open(a.documents).read().splitlines() if l]
tok = AutoTokenizer.from_pretrained(a.model_dir)
model = AutoModelForSequenceClassification.from_pretrained(a.model_dir).eval()
query = "how do search engines rank documents"
lat = []
tokens = 0
for i in range(a.requests + 2):
    start = (i * 7) % (len(docs) - a.docs + 1)
    batch = docs[start:start + a.docs]
    t = time.perf_counter()
    with torch.inference_mode():
        enc = tok([query] * len(batch), batch, padding=True, truncation="only_second",
                  max_length=512, return_tensors="pt")
        scores = torch.sigmoid(model(**enc).logits[:, 0])
        order = torch.argsort(scores, descending=True)
    if i >= 2:
        lat.append((time.perf_counter() - t) * 1000)
        tokens += int(enc["attention_mask"].sum())
lat.sort()
total = sum(lat) / 1000
print(json.dumps({"engine": "transformers-rerank", "docs_per_request": a.docs,
                  "p50_ms": lat[len(lat) // 2], "p95_ms": lat[round((len(lat) - 1) * 0.95)],
                  "pairs_per_s": a.requests * a.docs / total, "tokens_per_s": tokens / total}))
