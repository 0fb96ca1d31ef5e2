"""One bulk job through one or two replicas; see benches/run-replicas. Prints JSON lines."""

import argparse
import csv
import io
import json
import os
import re
import secrets
import sys
import time

import requests

# Replicas start as the scale-out smoke test starts them.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from scaleout_smoke import start  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
STAGES = ("claim", "read", "embed", "store", "commit")


def stage_totals(base):
    """(sum seconds, count) per stage from /metrics."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    totals = {}
    for stage in STAGES:
        s = re.search(rf'embedd_bulk_chunk_stage_seconds_sum{{stage="{stage}"}} (\S+)', text)
        c = re.search(rf'embedd_bulk_chunk_stage_seconds_count{{stage="{stage}"}} (\S+)', text)
        totals[stage] = (float(s.group(1)) if s else 0.0, int(float(c.group(1))) if c else 0)
    return totals


def run(opts, label, replicas, shared, body):
    procs = [start(opts.binary, f"{label}-{i}", shared, opts.work) for i in range(replicas)]
    bases = [b for _, b in procs]
    started = time.time()
    job = requests.post(f"{bases[0]}/v1/bulk-embeddings",
                        files={"file": ("rows.csv", body, "text/csv")},
                        data={"model": MODEL}, timeout=120).json()
    while True:
        status = requests.get(f"{bases[0]}/v1/bulk-embeddings/{job['_id']}", timeout=10).json()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.05)
    elapsed = time.time() - started
    assert status["status"] == "completed", status
    per_stage = {s: [0.0, 0] for s in STAGES}
    for base in bases:
        for s, (total, count) in stage_totals(base).items():
            per_stage[s][0] += total
            per_stage[s][1] += count
    for proc, _ in procs:
        proc.terminate()
        proc.wait()
    chunks = per_stage["commit"][1]
    mean_ms = {s: round(1000 * t / max(c, 1), 2) for s, (t, c) in per_stage.items()}
    coordination = sum(mean_ms[s] for s in ("claim", "read", "store", "commit"))
    print(json.dumps({
        "setup": label, "replicas": replicas, "rows": opts.rows, "seconds": round(elapsed, 2),
        "rows_per_s": round(opts.rows / elapsed, 1), "chunks": chunks,
        "ms_per_chunk": mean_ms, "coordination_ms_per_chunk": round(coordination, 2),
        "coordination_share": round(coordination / max(coordination + mean_ms["embed"], 1e-9), 4),
    }), flush=True)


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--binary", "--sentences", "--store", "--objects", "--work"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--rows", type=int, default=20000)
    opts = parser.parse_args()
    sentences = [l.strip() for l in open(opts.sentences) if l.strip()]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text"])
    for i in range(opts.rows):
        writer.writerow([sentences[i % len(sentences)]])
    body = out.getvalue().encode()
    key = secrets.token_hex(32)
    run(opts, "sqlite+files", 1, [], body)
    shared = ["--bulk-store", opts.store, "--bulk-objects", opts.objects, "--signing-key", key]
    run(opts, "postgres+s3", 1, shared, body)
    run(opts, "postgres+s3", 2, shared, body)


if __name__ == "__main__":
    main()
