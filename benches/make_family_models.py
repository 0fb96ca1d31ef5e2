#!/usr/bin/env python3
"""Full-size random-weight models of the Jina families, for speed and memory benches only:
a JinaBERT the size of jina-embeddings-v2-base-en (12 x 768, 12 heads, gated GELU 3072, ALiBi,
8192 tokens) in the hub's layout; an XLM-RoBERTa the size of jina-embeddings-v3 (24 x 1024,
16 heads, 4096, rotary, five rank-4 LoRA adapters on every Linear and Embedding, bfloat16) in its
flash-implementation layout, with a WordPiece-sized vocabulary instead of 250,002 (the vocabulary
size changes memory, not speed); and a T5 encoder the size of jina-embedding-s-en-v1 (t5-small:
6 x 512, 8 heads, 2048) saved by transformers. Both use the packaged MiniLM WordPiece tokenizer
(the ids only need to fit the vocabulary). Needs torch, transformers, safetensors.
"""
import json
import pathlib
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
H, L, HEADS, I, V = 768, 12, 12, 3072, 30528

jina = out / "jina-v2-base-random"
if not (jina / "model.safetensors").exists():
    jina.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02
    w = {"embeddings.word_embeddings.weight": r(V, H), "embeddings.token_type_embeddings.weight": r(2, H),
         "embeddings.LayerNorm.weight": torch.ones(H), "embeddings.LayerNorm.bias": torch.zeros(H)}
    for i in range(L):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w[p + f"attention.self.{n}.weight"] = r(H, H)
            w[p + f"attention.self.{n}.bias"] = torch.zeros(H)
        w[p + "attention.output.dense.weight"] = r(H, H)
        w[p + "attention.output.dense.bias"] = torch.zeros(H)
        w[p + "attention.output.LayerNorm.weight"] = torch.ones(H)
        w[p + "attention.output.LayerNorm.bias"] = torch.zeros(H)
        w[p + "mlp.gated_layers.weight"] = r(2 * I, H)
        w[p + "mlp.wo.weight"] = r(H, I)
        w[p + "mlp.wo.bias"] = torch.zeros(H)
        w[p + "mlp.layernorm.weight"] = torch.ones(H)
        w[p + "mlp.layernorm.bias"] = torch.zeros(H)
    save_file(w, str(jina / "model.safetensors"))
    (jina / "config.json").write_text(json.dumps({
        "architectures": ["JinaBertForMaskedLM"], "model_type": "bert", "hidden_size": H,
        "num_hidden_layers": L, "num_attention_heads": HEADS, "intermediate_size": I, "vocab_size": V,
        "hidden_act": "gelu", "feed_forward_type": "geglu", "position_embedding_type": "alibi",
        "max_position_embeddings": 8192, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}))
    shutil.copy(src / "tokenizer.json", jina / "tokenizer.json")

v3 = out / "jina-v3-random"
if not (v3 / "model.safetensors").exists():
    v3.mkdir(parents=True, exist_ok=True)
    H3, L3, HEADS3, I3, T, R = 1024, 24, 16, 4096, 5, 4
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
    w = {}

    def lora(name, a, b):
        w[f"{name}.parametrizations.weight.0.lora_A"] = r(T, *a)
        w[f"{name}.parametrizations.weight.0.lora_B"] = r(T, *b)

    def linear(name, o, i):
        w[f"{name}.parametrizations.weight.original"] = r(o, i)
        w[f"{name}.bias"] = torch.zeros(o, dtype=torch.bfloat16)
        lora(name, (R, i), (o, R))

    def norm(name):
        w[f"{name}.weight"] = torch.ones(H3, dtype=torch.bfloat16)
        w[f"{name}.bias"] = torch.zeros(H3, dtype=torch.bfloat16)

    for name, rows in (("roberta.embeddings.word_embeddings", V), ("roberta.embeddings.token_type_embeddings", 1)):
        w[f"{name}.parametrizations.weight.original"] = r(rows, H3)
        lora(name, (rows, R), (R, H3))
    norm("roberta.emb_ln")
    for i in range(L3):
        p = f"roberta.encoder.layers.{i}."
        linear(p + "mixer.Wqkv", 3 * H3, H3)
        linear(p + "mixer.out_proj", H3, H3)
        norm(p + "norm1")
        linear(p + "mlp.fc1", I3, H3)
        linear(p + "mlp.fc2", H3, I3)
        norm(p + "norm2")
    save_file(w, str(v3 / "model.safetensors"))
    tasks = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
    (v3 / "config.json").write_text(json.dumps({
        "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta", "hidden_size": H3,
        "auto_map": {"AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA"},
        "num_hidden_layers": L3, "num_attention_heads": HEADS3, "intermediate_size": I3, "vocab_size": V,
        "hidden_act": "gelu", "position_embedding_type": "rotary", "rotary_emb_base": 20000.0,
        "max_position_embeddings": 8194, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
        "lora_adaptations": tasks, "lora_rank": R, "lora_alpha": 1,
        "task_instructions": {t: "" for t in tasks}, "torch_dtype": "bfloat16"}))
    shutil.copy(src / "tokenizer.json", v3 / "tokenizer.json")

t5 = out / "t5-small-random"
if not (t5 / "model.safetensors").exists():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=30522, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                   feed_forward_proj="relu")
    T5EncoderModel(cfg).save_pretrained(t5)
    shutil.copy(src / "tokenizer.json", t5 / "tokenizer.json")
print(jina, v3, t5)
