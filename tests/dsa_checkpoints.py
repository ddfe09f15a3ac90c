"""Tiny DeepSeek-V3.2 checkpoints (DeepSeek sparse attention) built with transformers' own DeepseekV32 classes,
with an index_topk far below the test prompts' lengths so that the sparse path is really taken."""
import json
from pathlib import Path

import torch

from tests.checkpoints import COMMON, YARN

V32 = dict(q_lora_rank=48, num_hidden_layers=3, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
           topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
           rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
           index_n_heads=16, index_head_dim=32, index_topk=12)  # 16 heads: all-zero relu scores (ties) are rare


def build_v32(out: Path, seed: int = 0, **overrides) -> Path:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**COMMON, **dict(V32, **overrides))).eval()
    for layer in model.model.layers[V32["first_k_dense_replace"]:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def relabel(src: Path, out: Path, model_type: str) -> Path:
    """src's files with config.json's model_type changed (a V3.2 checkpoint mislabelled, for the loader's error)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, model_type=model_type)))
    return out


def build_glm_dsa(out: Path, seed: int = 0) -> Path:
    """GLM-MoE-DSA: V3.2's shapes, an interleaved indexer rope, and layer 1 reusing layer 0's top-k."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    torch.manual_seed(seed)
    kw = dict(V32, indexer_types=["full", "shared", "full"], rms_norm_eps=1e-5)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**COMMON, **kw)).eval()
    for layer in model.model.layers[V32["first_k_dense_replace"]:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    model.save_pretrained(out)
    return out
