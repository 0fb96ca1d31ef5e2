#!/usr/bin/env python3
"""Reference throughput on the same sentences: ONNX Runtime fp32 and sentence-transformers (torch).

Prints one JSON line per measurement, as embed-bench does. Needs torch, transformers,
sentence-transformers, onnxruntime (and onnx to export). The model is exported to ONNX once
(transformers BertModel, dynamic batch and sequence axes) into --onnx-cache.
"""
import argparse
import json
import os
import time

import numpy as np


def chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items) - n + 1, n)]


def measure(sentences, batch, seconds, step):
    cs = chunks(sentences, batch)
    for c in cs[:2]:
        step(c)
    n = tokens = 0
    start = time.perf_counter()
    while True:
        for c in cs:
            tokens += step(c)
            n += len(c)
            if time.perf_counter() - start >= seconds:
                el = time.perf_counter() - start
                return n, tokens, el


def report(engine, batch, n, tokens, el):
    print(json.dumps({"engine": engine, "batch": batch, "sentences_per_s": n / el,
                      "tokens_per_s": tokens / el, "sentences": n, "seconds": el}), flush=True)


def export_onnx(model_dir, path):
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(model_dir).eval()
    ids = torch.ones(2, 16, dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {0: "batch", 1: "seq"}
    kwargs = dict(input_names=["input_ids", "attention_mask", "token_type_ids"],
                  output_names=["last_hidden_state"], opset_version=17,
                  dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                "last_hidden_state": axes})
    try:
        torch.onnx.export(model, args, path, dynamo=False, **kwargs)
    except TypeError:
        torch.onnx.export(model, args, path, **kwargs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--onnx-cache", required=True)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--engines", default="onnxruntime,sentence-transformers")
    a = ap.parse_args()
    sentences = [l for l in open(a.sentences, encoding="utf-8").read().splitlines() if l]
    batches = [int(b) for b in a.batches.split(",")]
    engines = a.engines.split(",")

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    max_len = 256

    if "onnxruntime" in engines:
        import onnxruntime as ort
        path = os.path.join(a.onnx_cache, "model.onnx")
        if not os.path.exists(path):
            os.makedirs(a.onnx_cache, exist_ok=True)
            export_onnx(a.model_dir, path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        def ort_step(c):
            enc = tok(c, padding=True, truncation=True, max_length=max_len, return_tensors="np")
            feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = sess.run(None, feed)[0]
            m = feed["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            return int(feed["attention_mask"].sum())

        for b in batches:
            report("onnxruntime-fp32", b, *measure(sentences, b, a.seconds, ort_step))

    if "sentence-transformers" in engines:
        import torch
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(a.model_dir, device="cpu")

        def st_step(c):
            with torch.inference_mode():
                st.encode(c, batch_size=len(c), normalize_embeddings=True)
            return int(sum(len(x) for x in tok(c, truncation=True, max_length=max_len)["input_ids"]))

        for b in batches:
            report("sentence-transformers", b, *measure(sentences, b, a.seconds, st_step))


if __name__ == "__main__":
    main()
