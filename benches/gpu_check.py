#!/usr/bin/env python3
"""Black-box GPU checks of the embedd binary over HTTP (scripts/gpu-check runs them; stdlib only).

stage:  copies the fixture models into --out with f32 tensors stored as bf16 (half the bytes, so
        the models, the binary and the repo fit what travels to a GPU machine; CPU and GPU then
        read the same weights), and the MiniLM tokenizer files the bench models need;
record: serves every random-weight fixture family at once on --device cpu in f32 (the path the
        test suite holds to the references at cosine >= 0.9999) and saves its answers;
check:  serves the same models on --device cuda in each --dtype and compares answer for answer:
        cosine per vector (or per token vector) >= 0.9999 in f32 and >= 0.999 in f16/bf16, rerank
        scores within 1e-4 in f32, and the same rerank order;
bench:  sentences/s at request batches of 32 and 256 and tokens/s at 512-token inputs for the
        models under --bench-models (made by scripts/gpu-check), one model per server.
Every result is a JSON line on stdout and in --out.
"""
import argparse
import base64
import concurrent.futures
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures"

TEXTS = [
    "How is the weather today?",
    "",
    "Ein kurzer deutscher Satz.",
    "def add(a, b):\n    return a + b",
    " ".join(["the river keeps its course through every valley and the town listens"] * 12),
    "Rotary embeddings rotate queries and keys by position.",
]
QUERY = "where does the river run"
DOCUMENTS = [
    "the river runs through the valley",
    "a recipe for bread",
    "",
    " ".join(["long documents pad the batch so masks matter"] * 20),
    "rivers and valleys",
]
IMAGES = ["chelsea.jpg", "camera.png", "coffee.webp", "rocket.jpg"]

# model dir under tests/fixtures/models -> the routes it answers
FAMILIES = {
    "tiny-jina-bert": ["embed"],
    "tiny-jina-code": ["embed"],
    "tiny-jina-v3": ["embed", "tasks"],
    "tiny-qwen2-code": ["embed"],
    "tiny-qwen3": ["embed"],
    "tiny-eurobert": ["embed"],
    "tiny-jina-v5-small": ["embed", "tasks"],
    "tiny-jina-v5-nano": ["embed", "tasks"],
    "tiny-t5-relu": ["embed"],
    "tiny-t5-gated": ["embed"],
    "tiny-clip": ["embed", "images"],
    "tiny-jina-clip-v2": ["embed", "images"],
    "tiny-bert-cross-encoder": ["rerank"],
    "tiny-xlm-roberta-cross-encoder": ["rerank"],
    "tiny-jina-reranker": ["rerank"],
    "tiny-jina-reranker-v2": ["rerank"],
    "tiny-colbert": ["multi"],
    "tiny-jina-colbert": ["multi"],
    "tiny-jina-colbert-v2": ["multi"],
}
V3_TASKS = ["retrieval.query", "retrieval.passage", "text-matching", "classification", "separation"]


def post(base, route, body):
    req = urllib.request.Request(base + route, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def post_embeddings(args):
    base, body = args
    return post(base, "/v1/embeddings", body)


class Server:
    def __init__(self, binary, device, dtype, models, extra=()):
        self.tmp = tempfile.TemporaryDirectory(prefix="embedd-gpu-check-")
        args = [binary, "--host", "127.0.0.1", "--port", "0", "--device", device, "--dtype", dtype,
                "--weights-dir", self.tmp.name, "--data-dir", self.tmp.name, *extra]
        for name, path in models.items():
            args += ["--model", f"{name}={path}"]
        self.log = pathlib.Path(self.tmp.name) / "server.log"
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True, env={**os.environ, "RUST_LOG": "warn"})
        found = {}

        def read():
            for line in self.proc.stdout:
                if line.startswith("embedd listening on "):
                    found["base"] = line.split("embedd listening on ", 1)[1].strip()
                    break
            for _ in self.proc.stdout:
                pass

        threading.Thread(target=read, daemon=True).start()
        started = time.time()
        while "base" not in found:
            if self.proc.poll() is not None or time.time() - started > 300:
                self.proc.kill()
                raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.base = found["base"]
        if not self.base.startswith("http"):
            self.base = "http://" + self.base
        self.start_secs = time.time() - started

    def post(self, route, body):
        return post(self.base, route, body)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.tmp.cleanup()


def image_input(name):
    data = (FIXTURES / "images" / name).read_bytes()
    kind = {"jpg": "jpeg", "png": "png", "webp": "webp"}[name.rsplit(".", 1)[1]]
    return {"image": f"data:image/{kind};base64," + base64.b64encode(data).decode()}


def requests_for(model, routes):
    """(key, route, body, extract) for each request one model answers."""
    out = []
    emb = lambda r: [d["embedding"] for d in r["data"]]
    embed = lambda inputs, **more: {"model": model, "input": inputs, "normalized": False,
                                    "truncate": True, **more}
    if "embed" in routes:
        out.append(("texts", "/v1/embeddings", embed(TEXTS), emb))
    if "tasks" in routes:
        for task in V3_TASKS:
            out.append((f"task:{task}", "/v1/embeddings", embed(TEXTS, task=task), emb))
    if "images" in routes:
        mixed = [image_input(n) for n in IMAGES] + [{"text": t} for t in TEXTS[:3]]
        out.append(("images+texts", "/v1/embeddings", embed(mixed), emb))
    if "rerank" in routes:
        scores = lambda r: {str(x["index"]): x["relevance_score"] for x in r["results"]}
        out.append(("rerank", "/v1/rerank", {"model": model, "query": QUERY, "documents": DOCUMENTS,
                                              "top_n": None, "return_documents": False}, scores))
    if "multi" in routes:
        tok = lambda r: [d["embeddings"] for d in r["data"]]
        out.append(("documents", "/v1/multi-vector", {"model": model, "input": DOCUMENTS}, tok))
        out.append(("queries", "/v1/multi-vector",
                    {"model": model, "input": TEXTS[:4], "input_type": "query"}, tok))
    return out


def fixture_models(models_dir):
    return {name: str(pathlib.Path(models_dir) / name) for name in FAMILIES}


def f32_to_bf16(path, out):
    """Rewrites a safetensors file with its F32 tensors rounded to BF16 (round to nearest even)."""
    import array
    import struct
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = memoryview(raw)[8 + n:]
    meta = header.pop("__metadata__", None)
    new_header, chunks, offset = {}, [], 0
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = t["data_offsets"]
        data = bytes(body[start:end])
        if t["dtype"] == "F32":
            words = array.array("I")
            words.frombytes(data)
            if sys.byteorder != "little":
                words.byteswap()
            half = array.array("H", [((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF for w in words])
            data = half.tobytes()
            t = {**t, "dtype": "BF16"}
        new_header[name] = {**t, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if meta is not None:
        new_header["__metadata__"] = meta
    head = json.dumps(new_header).encode()
    head += b" " * (-len(head) % 8)
    out.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(chunks))


def stage(out, minilm):
    import shutil
    out = pathlib.Path(out)
    for name in FAMILIES:
        src, dst = FIXTURES / "models" / name, out / "models" / name
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
        f32_to_bf16(src / "model.safetensors", dst / "model.safetensors")
    tok = out / "minilm-tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for f in ["tokenizer.json", "modules.json", "sentence_bert_config.json"]:
        shutil.copy(pathlib.Path(minilm) / f, tok / f)
    shutil.copytree(pathlib.Path(minilm) / "1_Pooling", tok / "1_Pooling", dirs_exist_ok=True)


def answers(server):
    got = {}
    for model, routes in FAMILIES.items():
        for key, route, body, extract in requests_for(model, routes):
            status, resp = server.post(route, body)
            got[f"{model} {key}"] = extract(resp) if status == 200 else {"error": status, "body": str(resp)[:500]}
    return got


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return dot / (na * nb)


def compare(expected, got, dtype):
    floor = 0.9999 if dtype == "f32" else 0.999
    # Rerank scores move with the format's precision (bf16 keeps 8 bits of mantissa, f16 11):
    # in f32 within 1e-4 and the same order; in half precision within the tolerance, and the
    # same order for every pair of documents whose CPU scores are further apart than it.
    score_tol = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2}[dtype]
    rows = []
    for key, want in expected.items():
        have = got.get(key)
        row = {"case": key, "dtype": dtype}
        if isinstance(want, dict) and "error" in want:
            row.update(ok=False, why=f"CPU answer was an error: {want}")
        elif isinstance(have, dict) and "error" in have:
            row.update(ok=False, why=f"error {have['error']}: {have['body']}")
        elif isinstance(want, dict):  # rerank: index -> score
            diff = max(abs(want[i] - have[i]) for i in want)
            order_want = sorted(want, key=lambda i: -want[i])
            order_have = sorted(have, key=lambda i: -have[i])
            flipped = [(i, j) for i in want for j in want
                       if want[i] - want[j] > (0 if dtype == "f32" else score_tol) and have[i] <= have[j]]
            row.update(max_score_diff=diff, same_order=order_want == order_have,
                       flipped_beyond_tolerance=flipped, ok=diff <= score_tol and not flipped)
        else:
            flat_w, flat_h = [], []
            for w, h in zip(want, have):
                if w and isinstance(w[0], list):  # token vectors
                    if len(w) != len(h):
                        flat_w, flat_h = None, None
                        break
                    flat_w += w
                    flat_h += h
                else:
                    flat_w.append(w)
                    flat_h.append(h)
            if flat_w is None or len(want) != len(have):
                row.update(ok=False, why="vector or token counts differ")
            else:
                low = min(cosine(w, h) for w, h in zip(flat_w, flat_h))
                row.update(min_cosine=low, vectors=len(flat_w), ok=low >= floor)
        rows.append(row)
    return rows


def sentences(count, words):
    """benches/make_sentences.py's deterministic benchmark sentences."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        subprocess.run([sys.executable, str(ROOT / "benches/make_sentences.py"), "--count", str(count),
                        "--words", str(words), "--out", f.name], check=True)
        return f.read().splitlines()


def throughput(server, model, inputs, batch, concurrency, extra, seconds):
    """Sends `inputs` in requests of `batch`, `concurrency` in flight, and stops sending once
    `seconds` have passed (a slow model is measured on what it finished, not waited for). A
    429 (the server's admission refusing a long queue) is counted, not retried."""
    chunks = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
    server.post("/v1/embeddings", {"model": model, "input": chunks[0], **extra})  # warm-up
    done = tokens = refused = 0
    # client processes, not threads: one Python process's JSON work would be the bottleneck
    with concurrent.futures.ProcessPoolExecutor(concurrency) as pool:
        started = time.time()
        pending, queue = set(), iter(chunks)
        while True:
            while len(pending) < concurrency and time.time() - started < seconds:
                chunk = next(queue, None)
                if chunk is None:
                    break
                body = {"model": model, "input": chunk, **extra}
                pending.add(pool.submit(post_embeddings, (server.base, body)))
            if not pending:
                break
            finished, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in finished:
                status, resp = f.result()
                if status == 429:
                    refused += 1
                elif status != 200:
                    raise RuntimeError(f"bench request failed: {status} {str(resp)[:300]}")
                else:
                    done += len(resp["data"])
                    tokens += resp["usage"]["total_tokens"]
        secs = time.time() - started
    return {"inputs_per_s": round(done / secs, 1), "tokens_per_s": round(tokens / secs),
            "inputs": done, "tokens": tokens, "refused_429": refused, "secs": round(secs, 3)}


def emit(out, row):
    line = json.dumps(row)
    print(line, flush=True)
    with open(out, "a") as f:
        f.write(line + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["stage", "record", "check", "bench"])
    ap.add_argument("--bin")
    ap.add_argument("--models-dir", default=str(FIXTURES / "models"))
    ap.add_argument("--minilm", default=str(ROOT / "models/weights/all-MiniLM-L6-v2"), help="for stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--expected", help="record's output, for check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", action="append", help="f32, f16, bf16 (repeatable)")
    ap.add_argument("--bench-models", nargs="*", default=[], help="name=dir[:task]")
    ap.add_argument("--bench-seconds", type=float, default=10, help="sending stops after this long in each case")
    a = ap.parse_args()
    dtypes = a.dtype or ["f32"]

    if a.mode == "stage":
        stage(a.out, a.minilm)
        return 0

    if a.mode == "record":
        server = Server(a.bin, "cpu", "f32", fixture_models(a.models_dir))
        try:
            got = answers(server)
        finally:
            server.close()
        pathlib.Path(a.out).write_text(json.dumps(got))
        errors = [k for k, v in got.items() if isinstance(v, dict) and "error" in v]
        print(json.dumps({"recorded": len(got), "errors": errors}))
        return 1 if errors else 0

    if a.mode == "check":
        expected = json.loads(pathlib.Path(a.expected).read_text())
        failed = 0
        for dtype in dtypes:
            try:
                server = Server(a.bin, a.device, dtype, fixture_models(a.models_dir))
            except RuntimeError as e:
                emit(a.out, {"dtype": dtype, "ok": False, "why": str(e)})
                failed += 1
                continue
            try:
                emit(a.out, {"dtype": dtype, "server_start_secs": round(server.start_secs, 2)})
                for row in compare(expected, answers(server), dtype):
                    failed += not row["ok"]
                    emit(a.out, row)
            finally:
                server.close()
        emit(a.out, {"check": "done", "failed": failed})
        return 1 if failed else 0

    # bench
    short = sentences(8192, 20)
    long_text = " ".join(["token"] * 510)  # 512 WordPiece tokens with [CLS] and [SEP]
    for spec in a.bench_models:
        name, _, rest = spec.partition("=")
        path, _, task = rest.partition(":")
        # base64 output: the bench measures the model, not JSON float printing and parsing
        extra_body = {"encoding_format": "base64", **({"task": task} if task else {})}
        for dtype in dtypes:
            server = Server(a.bin, a.device, dtype, {name: path},
                            extra=["--max-client-batch-size", "4096"])
            try:
                for batch in (32, 256):
                    r = throughput(server, name, short, batch, 8, extra_body, a.bench_seconds)
                    emit(a.out, {"bench": name, "dtype": dtype, "case": f"sentences, request batch {batch}",
                                 **r})
                r = throughput(server, name, [long_text] * 1024, 32, 8, {**extra_body, "truncate": True},
                               a.bench_seconds)
                emit(a.out, {"bench": name, "dtype": dtype, "case": "512-token inputs, request batch 32", **r})
            except Exception as e:  # one model's failure leaves the others measured
                emit(a.out, {"bench": name, "dtype": dtype, "error": str(e)[:2000],
                             "log": server.log.read_text()[-2000:]})
            finally:
                server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
