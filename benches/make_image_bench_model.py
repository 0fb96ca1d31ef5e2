#!/usr/bin/env python3
"""A random-weight CLIP of ViT-B/32's full shape (12 x 768 vision, 12 x 512 text, 512-d space) in
the transformers layout, for image-bench: speed, not quality.

    benches/make_image_bench_model.py OUT_DIR [TOKENIZER_DIR]

TOKENIZER_DIR (default tests/fixtures/models/tiny-clip) gives the tokenizer and preprocessing."""
import pathlib
import shutil
import sys

import torch
from transformers import CLIPConfig, CLIPModel

out = pathlib.Path(sys.argv[1])
tok = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/models/tiny-clip")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
config = CLIPConfig(
    text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, eos_token_id=49407),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32),
    projection_dim=512,
)
CLIPModel(config).save_pretrained(out, safe_serialization=True)
for f in ["tokenizer.json", "preprocessor_config.json"]:
    shutil.copy(tok / f, out / f)
print(out)
