"""The default model's architecture for training: transformers' DeepseekV3ForCausalLM plus one MTP layer in
DeepSeek's layout (`model.layers.{L}`: enorm, hnorm, eh_proj, a decoder layer, shared_head.norm; the embedding
and output head are the main model's)."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm


@dataclass(slots=True)
class Arch:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 640
    moe_intermediate_size: int = 224
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 8
    max_position_embeddings: int = 1024


def hf_config(arch: Arch) -> DeepseekV3Config:
    fields = {name: getattr(arch, name) for name in Arch.__slots__}
    cfg = DeepseekV3Config(**fields, num_key_value_heads=arch.num_attention_heads, num_experts_per_tok=2,
                           n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                           norm_topk_prob=True, routed_scaling_factor=1.0, rope_scaling=None,
                           num_nextn_predict_layers=1, tie_word_embeddings=False, initializer_range=0.02,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg._attn_implementation = "sdpa"
    return cfg


class MTPLayer(DeepseekV3DecoderLayer):
    """h'_i = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) -> decoder layer -> head(norm(.)) predicts t_{i+2}.
    h_i is the main model's final (normed) hidden state, as vLLM's DeepSeek MTP takes it."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config, layer_idx=config.num_hidden_layers)
        dim = config.hidden_size
        self.enorm = DeepseekV3RMSNorm(dim, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(dim, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = DeepseekV3RMSNorm(dim, eps=config.rms_norm_eps)

    def predict(self, main: DeepseekV3ForCausalLM, hidden, next_ids, position_ids):
        x = torch.cat([self.enorm(main.model.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1)
        x = self.eh_proj(x)
        x = self(x, position_ids=position_ids, position_embeddings=main.model.rotary_emb(x, position_ids))
        return main.lm_head(self.shared_head.norm(x))


def build(arch: Arch, seed: int) -> tuple[DeepseekV3ForCausalLM, MTPLayer]:
    torch.manual_seed(seed)
    main = DeepseekV3ForCausalLM(hf_config(arch))
    mtp = MTPLayer(main.config)
    for module in mtp.modules():
        main._init_weights(module)
    return main, mtp


def mtp_tensors(mtp: MTPLayer, layer: int) -> dict[str, torch.Tensor]:
    """The MTP layer's weights under DeepSeek's checkpoint names, experts split one per tensor as HF stores them."""
    out = {}
    for name, t in mtp.state_dict().items():
        if name == "mlp.experts.gate_up_proj":
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"mlp.experts.{e}.gate_proj.weight"], out[f"mlp.experts.{e}.up_proj.weight"] = gate, up
        elif name == "mlp.experts.down_proj":
            out.update({f"mlp.experts.{e}.down_proj.weight": w for e, w in enumerate(t)})
        else:
            out[name] = t
    return {f"model.layers.{layer}.{k}": v for k, v in out.items()}


def save(main: DeepseekV3ForCausalLM, mtp: MTPLayer, out: Path, dtype=torch.bfloat16):
    """HF layout: save_pretrained for the main model, then the MTP layer added to the same safetensors file;
    weights stored in `dtype` except the router bias, which stays fp32 as transformers keeps it."""
    main.save_pretrained(out)
    path = out / "model.safetensors"
    tensors = load_file(path) | mtp_tensors(mtp, main.config.num_hidden_layers)
    cast = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)).contiguous() for k, v in tensors.items()}
    save_file(cast, path, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def mtp_state(tensors: dict[str, torch.Tensor], layer: int, experts: int) -> dict[str, torch.Tensor]:
    """The inverse of mtp_tensors: checkpoint tensors (any names; those of model.layers.{layer} taken) as the
    MTPLayer's state dict, experts stacked back into gate_up_proj / down_proj."""
    prefix = f"model.layers.{layer}."
    own = {k.removeprefix(prefix): v.float() for k, v in tensors.items() if k.startswith(prefix)}
    expert = "mlp.experts.{}.{}_proj.weight"
    needed = ["eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"] + \
        [expert.format(e, p) for e in range(experts) for p in ("gate", "up", "down")]
    missing = [prefix + name for name in needed if name not in own]
    if missing:
        raise ValueError(f"the checkpoint has no whole MTP layer: {len(missing)} tensors missing, e.g. "
                         f"{', '.join(missing[:3])}")
    state = {k: v for k, v in own.items() if not k.startswith("mlp.experts.")}
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([own[expert.format(e, "gate")], own[expert.format(e, "up")]]) for e in range(experts)])
    state["mlp.experts.down_proj"] = torch.stack([own[expert.format(e, "down")] for e in range(experts)])
    return state


def load(path: Path) -> tuple[DeepseekV3ForCausalLM, MTPLayer]:
    """A checkpoint written by save (or any with one MTP layer in DeepSeek's layout) as fp32 (main, mtp)."""
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the MTP tensors are not the main model's: transformers lists them as unused
    try:
        main = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    main.config._attn_implementation = "sdpa"
    mtp = MTPLayer(main.config)
    state = mtp_state(load_file(Path(path) / "model.safetensors"), main.config.num_hidden_layers,
                      main.config.n_routed_experts)
    mtp.load_state_dict(state, strict=True)
    return main, mtp
