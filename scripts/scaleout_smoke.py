"""Two embedd replicas sharing one PostgreSQL job store and one S3 bucket (scripts/scaleout-smoke
starts both services): a 5,000-row job uploaded through replica A; A killed with SIGKILL once the
job is under way; replica B finishes it. Checks: every row exactly once, in upload order, and each
sampled vector equal to a live /v1/embeddings call; the download link made by A's key works on B
(the shared --signing-key). Prints the job's rows/s and what the kill cost."""

import argparse
import csv
import io
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time

import requests

MODEL = "all-MiniLM-L6-v2"
ROWS = 5000


def start(binary, name, args, work):
    log = open(os.path.join(work, f"{name}.log"), "w")
    data = os.path.join(work, f"data-{name}")
    os.makedirs(data, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", "0", "--data-dir", data,
         "--weights-dir", "models/weights", "--model", MODEL, *args],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("embedd listening on "):
            base = line.split()[-1]
            break
        if time.time() > deadline:
            break
    else:
        sys.exit(f"replica {name} did not start; see {log.name}")
    # Keep draining stdout so the replica never blocks on a full pipe.
    subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    return proc, base


def rows_csv(n):
    texts = []
    for i in range(n):
        texts.append([
            f"row {i}, with a comma",
            f"row {i}\nspanning lines",
            f"row {i} \"quoted\" words",
            f"plain row number {i}",
        ][i % 4])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text"])
    for t in texts:
        writer.writerow([t])
    return texts, out.getvalue().encode()


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--objects", required=True)
    parser.add_argument("--work", required=True)
    opts = parser.parse_args()

    key = secrets.token_hex(32)
    shared = ["--bulk-store", opts.store, "--bulk-objects", opts.objects, "--signing-key", key,
              "--bulk-chunk-rows", "100", "--bulk-lease-secs", "4"]
    a, base_a = start(opts.binary, "a", shared, opts.work)
    b, base_b = start(opts.binary, "b", shared, opts.work)
    for base in (base_a, base_b):
        ready = requests.get(f"{base}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
    print(f"replicas: A {base_a}, B {base_b}; both /ready")

    texts, body = rows_csv(ROWS)
    started = time.time()
    job = requests.post(
        f"{base_a}/v1/bulk-embeddings",
        files={"file": ("rows.csv", body, "text/csv")},
        data={"model": MODEL},
        timeout=60,
    ).json()
    job_id = job["_id"]
    print(f"job {job_id}: {job['total_rows']} rows uploaded through A")

    # Kill A once the job is well under way but far from done: its leased chunks must be redone.
    while True:
        status = requests.get(f"{base_b}/v1/bulk-embeddings/{job_id}", timeout=10).json()
        if status["processed_rows"] >= 1000:
            break
        assert status["status"] in ("waiting", "in-progress"), status
        time.sleep(0.05)
    assert status["processed_rows"] < ROWS, f"the job finished before A could be killed: {status}"
    a.send_signal(signal.SIGKILL)
    a.wait()
    killed_at = time.time()
    print(f"A killed with SIGKILL at {status['processed_rows']} of {ROWS} rows")

    while True:
        status = requests.get(f"{base_b}/v1/bulk-embeddings/{job_id}", timeout=10).json()
        if status["status"] in ("completed", "failed"):
            break
        assert time.time() - killed_at < 600, f"B did not finish the job: {status}"
        time.sleep(0.2)
    elapsed = time.time() - started
    assert status["status"] == "completed", status
    assert status["processed_rows"] == ROWS, status

    link = requests.post(f"{base_b}/v1/bulk-embeddings/{job_id}/download-result", timeout=10)
    assert link.status_code == 200, link.text
    result = requests.get(link.json()["download_url"], timeout=120)
    assert result.status_code == 200, result.text[:500]
    reader = csv.reader(io.StringIO(result.text))
    assert next(reader) == ["text", "embedding"]
    rows = [(r[0], json.loads(r[1])) for r in reader]
    assert len(rows) == ROWS, f"{len(rows)} rows in the result, expected {ROWS}"
    assert [r[0] for r in rows] == texts, "rows are missing, repeated or out of order"

    sample = list(range(0, ROWS, 97))
    live = requests.post(
        f"{base_b}/v1/embeddings",
        json={"model": MODEL, "input": [texts[i] for i in sample]},
        timeout=120,
    ).json()["data"]
    worst = min(cosine(rows[i][1], live[k]["embedding"]) for k, i in enumerate(sample))
    assert worst > 0.99999, f"a bulk vector differs from the live call: cosine {worst}"

    # A link signed by one replica is served by the other: the same job through A's signer.
    a2, base_a2 = start(opts.binary, "a2", shared, opts.work)
    other = requests.get(link.json()["download_url"].replace(base_b, base_a2), timeout=120)
    assert other.status_code == 200 and other.text == result.text, other.status_code
    a2.terminate()
    print(f"every row once and in order; sampled vectors equal to live calls (worst cosine {worst:.7f})")
    print(f"job: {ROWS} rows in {elapsed:.1f} s ({ROWS / elapsed:.0f} rows/s) with A killed "
          f"{killed_at - started:.1f} s in; the link from B is served by a fresh replica too")

    openai_batch(opts, shared, base_b, texts)
    b.terminate()


def openai_batch(opts, shared, base_b, texts):
    """The same through the OpenAI Batch API, with the openai client: the file and the batch
    created through replica C, C killed mid-batch, B finishing it."""
    from openai import OpenAI

    requests_n = 2000
    c, base_c = start(opts.binary, "c", shared, opts.work)
    path = os.path.join(opts.work, "batch.jsonl")
    with open(path, "w") as f:
        for i in range(requests_n):
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": MODEL, "input": texts[i]}}) + "\n")
    client_c = OpenAI(base_url=f"{base_c}/v1", api_key="unused", max_retries=0)
    client_b = OpenAI(base_url=f"{base_b}/v1", api_key="unused", max_retries=0)
    with open(path, "rb") as f:
        uploaded = client_c.files.create(file=f, purpose="batch")
    batch = client_c.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                    completion_window="24h", metadata={"smoke": "scale-out"})
    assert batch.status == "in_progress", batch
    started = time.time()
    while True:
        now = client_b.batches.retrieve(batch.id)
        if now.request_counts.completed >= 400:
            break
        assert now.status == "in_progress", now
        time.sleep(0.05)
    assert now.request_counts.completed < requests_n, "the batch finished before C could be killed"
    c.send_signal(signal.SIGKILL)
    c.wait()
    print(f"batch {batch.id}: C killed with SIGKILL at {now.request_counts.completed} of "
          f"{requests_n} requests")
    while True:
        now = client_b.batches.retrieve(batch.id)
        if now.status not in ("validating", "in_progress", "finalizing"):
            break
        assert time.time() - started < 600, f"B did not finish the batch: {now}"
        time.sleep(0.2)
    elapsed = time.time() - started
    assert now.status == "completed", now
    assert now.request_counts.completed == requests_n and now.request_counts.failed == 0, now
    assert now.metadata == {"smoke": "scale-out"}, now.metadata
    lines = [json.loads(l) for l in client_b.files.content(now.output_file_id).text.splitlines()]
    assert [l["custom_id"] for l in lines] == [f"req-{i}" for i in range(requests_n)], \
        "requests are missing, repeated or out of order"
    sample = list(range(0, requests_n, 97))
    live = client_b.embeddings.create(model=MODEL, input=[texts[i] for i in sample]).data
    worst = min(cosine(lines[i]["response"]["body"]["data"][0]["embedding"], live[k].embedding)
                for k, i in enumerate(sample))
    assert worst > 0.99999, f"a batch answer differs from the live call: cosine {worst}"
    print(f"openai client: {requests_n} requests answered once each, in order, equal to live "
          f"calls (worst cosine {worst:.7f}); {requests_n / elapsed:.0f} requests/s with C killed")


if __name__ == "__main__":
    main()
