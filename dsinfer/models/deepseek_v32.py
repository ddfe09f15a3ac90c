"""DeepSeek-V3.2 (model type deepseek_v32): DeepSeek-V3 with DeepSeek sparse attention, a lightning indexer in
every layer choosing the index_topk cached tokens each query attends to (layers/sparse_attention.py). Its cache
holds, per layer, the latent rows and the indexer's keys (engine/kv_cache.py). GLM-MoE-DSA (glm_moe_dsa) is the
same model with an interleaved indexer rope and "shared" layers that reuse the previous full layer's top-k."""
from dsinfer.config import ModelConfig
from dsinfer.kernels import KernelConfig
from dsinfer.layers.rope import RotaryEmbedding
from dsinfer.layers.sparse_attention import IndexedMLA
from dsinfer.models.deepseek import DecoderLayer, DeepseekForCausalLM, DeepseekModel


class IndexedDecoderLayer(DecoderLayer):
    def attention(self, cfg: ModelConfig, idx: int, mla_mode: str, rotary: RotaryEmbedding, kc: KernelConfig):
        return IndexedMLA(cfg, mla_mode, rotary, kc, own_indexer=cfg.runs_indexer(idx))


class IndexedModel(DeepseekModel):
    layer_class = IndexedDecoderLayer

    def __init__(self, cfg: ModelConfig, mla_mode: str, kc: KernelConfig):
        super().__init__(cfg, mla_mode, kc)
        full = None
        for layer in self.layers:  # the first layer has its own indexer (ModelConfig checks it)
            attn = layer.self_attn
            full = attn if attn.indexer is not None else full
            if attn.indexer is None:
                attn.share(full)


class DeepseekV32ForCausalLM(DeepseekForCausalLM):
    model_class = IndexedModel

    def set_indexer(self, on: bool):
        """on: each query attends to the indexer's top-k (the model as trained); off: dense attention over the
        same weights, for comparison only."""
        for layer in self.model.layers:
            layer.self_attn.use_indexer = on
