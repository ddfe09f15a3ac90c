"""DeepSeek-V2 / V3 (model types deepseek_v2 and deepseek_v3): MLA attention, dense then MoE MLPs."""
import torch
from torch import nn

from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.attention import MLA, AttentionMetadata
from dsinfer.layers.embedding import embed
from dsinfer.layers.linear import Linear, Matmul
from dsinfer.layers.mlp import MLP
from dsinfer.layers.moe import MoE
from dsinfer.layers.norm import RMSNorm
from dsinfer.layers.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, mla_mode: str, rotary: RotaryEmbedding, kc: KernelConfig):
        super().__init__()
        self.self_attn = self.attention(cfg, idx, mla_mode, rotary, kc)
        self.mlp = MoE(cfg, kc) if cfg.is_moe_layer(idx) else MLP(cfg.hidden_size, cfg.intermediate_size, kc)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kc)

    def attention(self, cfg: ModelConfig, idx: int, mla_mode: str, rotary: RotaryEmbedding, kc: KernelConfig):
        return MLA(cfg, mla_mode, rotary, kc)

    def forward(self, x, positions, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    layer_class = DecoderLayer

    def __init__(self, cfg: ModelConfig, mla_mode: str, kc: KernelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(self.layer_class(cfg, i, mla_mode, self.rotary, kc)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kc)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed(input_ids, self.embed_tokens).to(self.norm.weight.dtype).contiguous()  # bf16 table when quantized

    def forward(self, input_ids, positions, meta: AttentionMetadata, caches: list[torch.Tensor]) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, positions, meta, cache)
        return self.norm(x)

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        if getattr(self, "embed_mapped", False):  # already backed by the checkpoint file itself
            return {}
        return {f"{prefix}embed_tokens.weight": self.embed_tokens.data}


class DeepseekForCausalLM(nn.Module):
    model_class = DeepseekModel

    def __init__(self, cfg: ModelConfig, mla_mode: str = "auto", kc: KernelConfig = PLAIN):
        super().__init__()
        self.config, self.kernel_config = cfg, kc
        self.model = self.model_class(cfg, mla_mode, kc)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, kc=kc)
        self.matmul = Matmul(kc)

    def forward(self, input_ids, positions, meta, caches) -> torch.Tensor:
        return self.model(input_ids, positions, meta, caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens if self.lm_head is None else self.lm_head.weight
        return self.matmul(hidden, w).float()
