"""The DeepSeek model split over a tensor-parallel group (dsinfer/layers/parallel.py says what is split). Every
rank holds the same hidden states between layers: attention and the MLP / MoE each end in one all-reduce of
their partial sums, the embedding in one more, and the LM head gathers each rank's vocabulary slice of the
logits on rank 0. The single-process model (deepseek.py) is untouched by any of this."""
import torch
from torch import nn

from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.attention import MLA
from dsinfer.layers.embedding import FileRows, embed
from dsinfer.layers.linear import Linear, Matmul
from dsinfer.layers.mlp import MLP
from dsinfer.layers.moe import MoE
from dsinfer.layers.norm import RMSNorm
from dsinfer.layers.parallel import ExpertSlice, Shard, vocab_embed
from dsinfer.layers.rope import RotaryEmbedding
from dsinfer.models.deepseek import DecoderLayer, DeepseekForCausalLM, DeepseekModel


def sharded_moe(cfg: ModelConfig, local: ModelConfig, kc: KernelConfig, shard: Shard) -> MoE:
    """The router replicated; shared experts split by intermediate; routed experts by intermediate (local has
    it divided) or, with expert parallelism, E / size whole experts per rank."""
    moe = MoE(local, kc)
    if shard.expert_parallel:
        n = cfg.n_routed_experts // shard.size
        moe.experts = ExpertSlice(shard.rank * n, n, cfg.n_routed_experts, cfg.hidden_size,
                                  cfg.moe_intermediate_size, kc)
        if cfg.n_shared_experts:
            moe.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts // shard.size, kc)
    return moe


class ParallelDecoderLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, idx: int, mla_mode: str, rotary: RotaryEmbedding, kc: KernelConfig,
                 shard: Shard):
        nn.Module.__init__(self)
        local, self.shard = shard.local_config(cfg), shard
        self.self_attn = MLA(local, mla_mode, rotary, kc)  # its heads; the latent projections whole
        self.mlp = sharded_moe(cfg, local, kc, shard) if cfg.is_moe_layer(idx) else \
            MLP(cfg.hidden_size, local.intermediate_size, kc)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kc)

    def forward(self, x, positions, meta, cache):
        x = x + self.shard.all_reduce(self.self_attn(self.input_layernorm(x), positions, meta, cache))
        return x + self.shard.all_reduce(self.mlp(self.post_attention_layernorm(x)))


class ParallelDeepseekModel(DeepseekModel):
    def __init__(self, cfg: ModelConfig, mla_mode: str, kc: KernelConfig, shard: Shard):
        nn.Module.__init__(self)
        self.config, self.shard = cfg, shard
        self.embed_tokens = nn.Parameter(torch.empty(shard.part(cfg.vocab_size, "vocab_size"), cfg.hidden_size))
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(ParallelDecoderLayer(cfg, i, mla_mode, self.rotary, kc, shard)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kc)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A table left in the checkpoint file is read whole by every rank (it costs no memory); one in memory
        is split by vocabulary."""
        table, dtype = self.embed_tokens, self.norm.weight.dtype
        x = embed(input_ids, table) if isinstance(table, FileRows) else vocab_embed(input_ids, table, self.shard)
        return x.to(dtype).contiguous()


class ParallelDeepseekForCausalLM(DeepseekForCausalLM):
    def __init__(self, cfg: ModelConfig, mla_mode: str = "auto", kc: KernelConfig = PLAIN, shard: Shard = None):
        nn.Module.__init__(self)
        self.config, self.kernel_config, self.shard = cfg, kc, shard
        self.model = ParallelDeepseekModel(cfg, mla_mode, kc, shard)
        rows = shard.part(cfg.vocab_size, "vocab_size")
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, rows, kc=kc)
        self.matmul = Matmul(kc)
        self.fused = None  # a ParallelFusedDecoder, set after loading (models/parallel_fused.py)

    def forward(self, input_ids, positions, meta, caches) -> torch.Tensor:
        """Decode steps that fit through the fused decode layer, the rest through the Python layers: every rank
        decides alike (the same inputs)."""
        if self.fused is not None and self.fused.takes(input_ids.shape[0], meta, caches):
            return self.fused(input_ids, positions, meta, caches)
        return self.model(input_ids, positions, meta, caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rank 0: the full logits [T, vocab]; other ranks: their slice (not used)."""
        return self.shard.gather_last(super().compute_logits(hidden))

    def drop_replicated_biases(self):
        """o_proj's bias is part of a sum over ranks: only rank 0 keeps it."""
        if self.shard.rank:
            for layer in self.model.layers:
                if layer.self_attn.o_proj.bias is not None:
                    layer.self_attn.o_proj.bias.data.zero_()
