"""DeepSeek-V2 / V3 (model types deepseek_v2 and deepseek_v3): MLA attention, dense then MoE MLPs."""
import torch
from torch import nn

from dsinfer.config import ModelConfig
from dsinfer.layers.attention import MLA, AttentionMetadata
from dsinfer.layers.embedding import embed
from dsinfer.layers.linear import Linear, linear
from dsinfer.layers.mlp import MLP
from dsinfer.layers.moe import MoE
from dsinfer.layers.norm import RMSNorm
from dsinfer.layers.rope import RotaryEmbedding
from dsinfer.models import decode_plan


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, mla_mode: str, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = MLA(cfg, mla_mode, rotary)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig, mla_mode: str):
        super().__init__()
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, mla_mode, self.rotary) for i in range(cfg.num_hidden_layers))
        self.config, self.plan = cfg, None  # the fused decode plan, made at the first decode batch
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, meta: AttentionMetadata, caches: list[torch.Tensor]) -> torch.Tensor:
        x = embed(input_ids, self.embed_tokens).to(self.norm.weight.dtype).contiguous()  # bf16 table when quantized
        if decode_plan.usable(x, meta, caches) and self.fused_plan():
            decode_plan.run(self.plan, x, positions, self.rotary.rotation(positions), meta, caches)
            return self.norm(x)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, positions, meta, cache)
        return self.norm(x)

    def fused_plan(self) -> list | None:
        if self.plan is None:
            self.plan = decode_plan.build(self) or []  # [] : some layer cannot take it
        return self.plan

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        if getattr(self, "embed_mapped", False):  # already backed by the checkpoint file itself
            return {}
        return {f"{prefix}embed_tokens.weight": self.embed_tokens.data}


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, mla_mode: str = "auto"):
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg, mla_mode)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, input_ids, positions, meta, caches) -> torch.Tensor:
        return self.model(input_ids, positions, meta, caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens if self.lm_head is None else self.lm_head.weight
        return linear(hidden, w).float()
