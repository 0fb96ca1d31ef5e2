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
weights = {k: v for k, v in load_file(str(pathlib.Path(a.model_dir) / "model.safetensors")).items()
           if k.startswith("vision_model.")}

import timm.models.eva as eva  # noqa: E402
model = eva.Eva(img_size=jc.SIDE, patch_size=jc.PATCH, embed_dim=jc.WIDTH, depth=jc.LAYERS, num_heads=jc.HEADS,
                mlp_ratio=jc.MLP / jc.WIDTH, qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(jc.PT_HW, jc.PT_HW),
                num_classes=0, global_pool="token").eval()
renames = {"attn.q_bias": "attn.q_proj.bias", "attn.v_bias": "attn.v_proj.bias", "attn.inner_attn_ln": "attn.norm",
           "mlp.w1": "mlp.fc1_g", "mlp.w2": "mlp.fc1_x", "mlp.ffn_ln": "mlp.norm", "mlp.w3": "mlp.fc2"}
state = {}
for name, value in weights.items():
    name = name.removeprefix("vision_model.")
    for ours, theirs in renames.items():
        name = name.replace(ours, theirs)
    state[name] = value.float()
model.load_state_dict(state)
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
