#!/usr/bin/env python3
"""transformers' CLIPModel.get_image_features on torch (f32), images/s at given batch sizes, on
the same photos preprocessed once by CLIPImageProcessor (the decode + preprocess rate printed
apart). One JSON line per measurement, as image-bench prints."""
import argparse
import json
import time

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", required=True)
ap.add_argument("--images", nargs="+", required=True)
ap.add_argument("--batches", default="1,32")
ap.add_argument("--seconds", type=float, default=10)
a = ap.parse_args()
model = CLIPModel.from_pretrained(a.model_dir).eval()
processor = CLIPImageProcessor.from_pretrained(a.model_dir)
start, n = time.perf_counter(), 0
while time.perf_counter() - start < min(a.seconds, 5):
    pixels = processor(images=[Image.open(p) for p in a.images], return_tensors="pt")["pixel_values"]
    n += len(a.images)
elapsed = time.perf_counter() - start
print(json.dumps({"engine": "transformers-preprocess", "images": n, "seconds": elapsed, "images_per_s": n / elapsed}))
for batch in [int(b) for b in a.batches.split(",")]:
    x = pixels.repeat((batch + len(pixels) - 1) // len(pixels), 1, 1, 1)[:batch]
    with torch.inference_mode():
        model.get_image_features(pixel_values=x)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < a.seconds:
            model.get_image_features(pixel_values=x)
            done += batch
    elapsed = time.perf_counter() - start
    print(json.dumps({"engine": "transformers-torch-f32", "batch": batch, "images": done,
                      "seconds": elapsed, "images_per_s": done / elapsed}))
