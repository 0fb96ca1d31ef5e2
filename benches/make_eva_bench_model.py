#!/usr/bin/env python3
"""A random-weight jina-clip checkpoint whose vision tower has EVA02-B/16's full shape (224 px,
16-pixel patches, 12 x 768, 12 heads, SwiGLU 2048, rotary grid 14: jina-clip-v1's tower) in the
hub's tensor names, for image-bench: speed, not quality. The text tower is the tiny fixture's.

    benches/make_eva_bench_model.py OUT_DIR"""
import json
import pathlib
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
import make_jina_clip_fixture as jc  # noqa: E402

out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
jc.SIDE, jc.PATCH, jc.WIDTH, jc.HEADS, jc.LAYERS, jc.PT_HW = 224, 16, 768, 12, 12, 14
jc.MLP, jc.GRID = int(768 * 2.6667), 224 // 16
vision = {k: v.float() for k, v in jc.vision_weights(1).items()}
text = {"text_model.transformer." + k: v.float() for k, v in jc.v3.init_weights(2).items()}
# The tiny text tower (64 wide) reaches the 768-d space through `text_model.proj`.
text["text_model.proj.weight"] = torch.randn(768, jc.v3.HIDDEN) * 0.1
save_file({k: v.contiguous() for k, v in {**vision, **text}.items()}, str(out / "model.safetensors"),
          metadata={"format": "pt"})
config = jc.text_config()
config["text_config"]["proj_type"] = "linear"
(out / "config.json").write_text(json.dumps(config, indent=2))
fixture = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models" / "tiny-jina-clip-v2"
shutil.copy(fixture / "tokenizer.json", out / "tokenizer.json")
processor = json.loads((fixture / "preprocessor_config.json").read_text())
processor["size"] = 224
(out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
print(out)
