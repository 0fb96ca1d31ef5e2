#!/usr/bin/env python3
"""timm's Eva (EVA02) on torch (f32) built on a jina-clip checkpoint's vision weights: images/s
at given batch sizes on the same photos, preprocessed once by torchvision's Resize, CenterCrop,
ToTensor and Normalize as JinaCLIPImageProcessor does (its rate printed apart). One JSON line
per measurement, as image-bench prints.

    benches/reference_eva_images.py --model-dir DIR --images FILES... [--batches 1,32]"""
import argparse
import json
import pathlib
import sys
import time

import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
import make_jina_clip_fixture as jc  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", required=True)
ap.add_argument("--images", nargs="+", required=True)
ap.add_argument("--batches", default="1,32")
ap.add_argument("--seconds", type=float, default=10)
a = ap.parse_args()
config = json.loads((pathlib.Path(a.model_dir) / "config.json").read_text())["vision_config"]
jc.SIDE, jc.PATCH, jc.WIDTH = config["image_size"], config["patch_size"], config["width"]
jc.HEADS, jc.LAYERS, jc.PT_HW = config["width"] // config["head_width"], config["layers"], config["pt_hw_seq_len"]
jc.MLP, jc.GRID = int(config["width"] * config["mlp_ratio"]), jc.SIDE // jc.PATCH
model = jc.timm_model(load_file(str(pathlib.Path(a.model_dir) / "model.safetensors")), torch.float32)
preprocess = transforms.Compose([
    transforms.Resize(jc.SIDE, interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.CenterCrop(jc.SIDE), transforms.ToTensor(), transforms.Normalize(jc.MEAN, jc.STD)])
start, n = time.perf_counter(), 0
while time.perf_counter() - start < min(a.seconds, 5):
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in a.images])
    n += len(a.images)
elapsed = time.perf_counter() - start
print(json.dumps({"engine": "torchvision-preprocess", "images": n, "seconds": elapsed, "images_per_s": n / elapsed}))
for batch in [int(b) for b in a.batches.split(",")]:
    x = pixels.repeat((batch + len(pixels) - 1) // len(pixels), 1, 1, 1)[:batch]
    with torch.inference_mode():
        model(x)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < a.seconds:
            model(x)
            done += batch
    elapsed = time.perf_counter() - start
    print(json.dumps({"engine": "timm-eva-torch-f32", "batch": batch, "images": done,
                      "seconds": elapsed, "images_per_s": done / elapsed}))
