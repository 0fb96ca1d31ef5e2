#!/usr/bin/env python3
"""Reference throughput on the same sentences: ONNX Runtime fp32 and int8, sentence-transformers.

Prints one JSON line per measurement, as embed-bench does. Needs torch, transformers,
sentence-transformers, onnxruntime (and onnx to export). The model is exported to ONNX once
(transformers BertModel, dynamic batch and sequence axes) into --onnx-cache, and quantized from
there with ONNX Runtime's dynamic quantization (int8 weights, activations quantized per call:
what fastembed-style CPU pipelines use). ONNX Runtime gets its best case, as its careful users
give it: the sentences sorted by token count before they are cut into batches, so a batch pads
little. --vectors-out DIR writes each engine's vectors for the first --vector-count sentences
(DIR/ENGINE.json) for the cosine check in run-embeddings.
"""
import argparse
import json
import os
import time

import numpy as np


def chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items) - n + 1, n)]


def sorted_batches(sentences, lengths, n):
    """Batches cut from the sentences sorted by length, in a fixed shuffled order: a short run
    then sees the same mix of lengths as a whole pass does, not only the shortest batches."""
    by_length = [s for _, s in sorted(zip(lengths, sentences), key=lambda p: p[0])]
    batches = chunks(by_length, n)
    np.random.default_rng(0).shuffle(batches)
    return batches


def measure(sentences, batch, seconds, step, batches=None):
    cs = batches if batches is not None else chunks(sentences, batch)
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


def quantized(path):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = path.replace(".onnx", ".int8.onnx")
    if not os.path.exists(out):
        quantize_dynamic(path, out, weight_type=QuantType.QInt8)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--onnx-cache", required=True)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--engines", default="onnxruntime,onnxruntime-int8,sentence-transformers")
    ap.add_argument("--vectors-out")
    ap.add_argument("--vector-count", type=int, default=128)
    a = ap.parse_args()
    sentences = [l for l in open(a.sentences, encoding="utf-8").read().splitlines() if l]
    batches = [int(b) for b in a.batches.split(",")]
    engines = a.engines.split(",")

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    max_len = 256
    first = sentences[:a.vector_count]

    def save_vectors(engine, vectors):
        if a.vectors_out:
            os.makedirs(a.vectors_out, exist_ok=True)
            with open(os.path.join(a.vectors_out, engine + ".json"), "w") as f:
                json.dump(np.asarray(vectors, dtype=np.float64).tolist(), f)

    ort_engines = [e for e in ("onnxruntime", "onnxruntime-int8") if e in engines]
    if ort_engines:
        import onnxruntime as ort
        path = os.path.join(a.onnx_cache, "model.onnx")
        if not os.path.exists(path):
            os.makedirs(a.onnx_cache, exist_ok=True)
            export_onnx(a.model_dir, path)
        lengths = [len(x) for x in tok(sentences, truncation=True, max_length=max_len)["input_ids"]]
        for engine in ort_engines:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            model = path if engine == "onnxruntime" else quantized(path)
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

            def ort_embed(c):
                enc = tok(c, padding=True, truncation=True, max_length=max_len, return_tensors="np")
                feed = {k: enc[k].astype(np.int64)
                        for k in ("input_ids", "attention_mask", "token_type_ids")}
                hidden = sess.run(None, feed)[0]
                m = feed["attention_mask"][..., None].astype(np.float32)
                pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
                pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
                return pooled, int(feed["attention_mask"].sum())

            name = "onnxruntime-fp32" if engine == "onnxruntime" else "onnxruntime-int8"
            save_vectors(name, np.concatenate([ort_embed(first[i:i + 32])[0]
                                                 for i in range(0, len(first), 32)]))
            for b in batches:
                report(name, b, *measure(sentences, b, a.seconds, lambda c: ort_embed(c)[1],
                                         sorted_batches(sentences, lengths, b)))

    if "sentence-transformers" in engines:
        import torch
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(a.model_dir, device="cpu")
        with torch.inference_mode():
            save_vectors("sentence-transformers",
                         st.encode(first, batch_size=32, normalize_embeddings=True))

        def st_step(c):
            with torch.inference_mode():
                st.encode(c, batch_size=len(c), normalize_embeddings=True)
            return int(sum(len(x) for x in tok(c, truncation=True, max_length=max_len)["input_ids"]))

        for b in batches:
            report("sentence-transformers", b, *measure(sentences, b, a.seconds, st_step))


if __name__ == "__main__":
    main()
