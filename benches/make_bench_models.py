#!/usr/bin/env python3
"""Builds full-size models for the rerank and ColBERT benches from the packaged all-MiniLM-L6-v2
weights (no hub needed): a cross-encoder (BertForSequenceClassification, 6 layers x 384, the
architecture of cross-encoder/ms-marco-MiniLM-L-6-v2) and a ColBERT checkpoint (colbertv2.0
layout, projection 384 -> 128, doc_maxlen 256). The heads are random: these measure speed, not
quality. Needs torch, transformers, safetensors.
"""
import json
import pathlib
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, BertModel

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
tokenizer_files = ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]

torch.manual_seed(0)
ce_dir = out / "minilm-cross-encoder"
if not (ce_dir / "model.safetensors").exists():
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1)
    model.save_pretrained(ce_dir, safe_serialization=True)
    for f in tokenizer_files:
        shutil.copy(src / f, ce_dir / f)

colbert_dir = out / "minilm-colbert"
if not (colbert_dir / "model.safetensors").exists():
    colbert_dir.mkdir(parents=True, exist_ok=True)
    bert = BertModel.from_pretrained(src, add_pooling_layer=False)
    tensors = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}
    tensors["linear.weight"] = torch.randn(128, 384) * 0.05
    save_file(tensors, str(colbert_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["HF_ColBERT"]
    (colbert_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_files:
        shutil.copy(src / f, colbert_dir / f)
    (colbert_dir / "artifact.metadata").write_text(json.dumps(
        {"query_maxlen": 32, "doc_maxlen": 256, "dim": 128, "mask_punctuation": True,
         "attend_to_mask_tokens": False}))
print(ce_dir, colbert_dir)
