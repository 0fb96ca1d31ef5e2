#!/usr/bin/env python3
"""Writes N benchmark sentences of about --tokens word pieces each (deterministic)."""
import argparse
import random

WORDS = ("the a search engine returns ranked documents for each query while the embedding model maps "
         "text into vectors and the server batches requests to keep latency low under load with "
         "attention layers pooling tokens into one representation that compares by cosine similarity "
         "across large collections of passages written in plain english").split()

ap = argparse.ArgumentParser()
ap.add_argument("--count", type=int, default=2048)
ap.add_argument("--words", type=int, default=20, help="mean words per sentence (~1.1 tokens each)")
ap.add_argument("--out", required=True)
a = ap.parse_args()
rng = random.Random(7)
with open(a.out, "w") as f:
    for _ in range(a.count):
        n = max(3, int(rng.gauss(a.words, 3)))
        f.write(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".\n")
