#!/usr/bin/env python3
"""Writes N benchmark sentences (deterministic): about --words words each, or with --mixed a
long-tailed mix of lengths from 8 to about 512 tokens (log-normal, median about 40)."""
import argparse
import random

WORDS = ("the a search engine returns ranked documents for each query while the embedding model maps "
         "text into vectors and the server batches requests to keep latency low under load with "
         "attention layers pooling tokens into one representation that compares by cosine similarity "
         "across large collections of passages written in plain english").split()

ap = argparse.ArgumentParser()
ap.add_argument("--count", type=int, default=2048)
ap.add_argument("--words", type=int, default=20, help="mean words per sentence (~1.1 tokens each)")
ap.add_argument("--mixed", action="store_true", help="long-tailed lengths instead of --words")
ap.add_argument("--out", required=True)
a = ap.parse_args()
rng = random.Random(7)
with open(a.out, "w") as f:
    for _ in range(a.count):
        if a.mixed:
            n = min(460, max(6, int(rng.lognormvariate(3.6, 0.9))))
        else:
            n = max(3, int(rng.gauss(a.words, 3)))
        f.write(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".\n")
