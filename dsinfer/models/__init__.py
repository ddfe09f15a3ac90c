import torch

from dsinfer import malloc
from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.block_sparse import BlockSparseMLA, SparseConfig
from dsinfer.models import quant_plan
from dsinfer.models.deepseek import DeepseekForCausalLM
from dsinfer.models.deepseek_v32 import DeepseekV32ForCausalLM
from dsinfer.models.loader import load_weights
from dsinfer.models.parallel_model import ParallelDeepseekForCausalLM
from dsinfer.models.parallel_fused import ParallelFusedDecoder

MODEL_CLASSES = {"deepseek_v2": DeepseekForCausalLM, "deepseek_v3": DeepseekForCausalLM,
                 "deepseek_v32": DeepseekV32ForCausalLM, "glm_moe_dsa": DeepseekV32ForCausalLM}


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, mla_mode: str = "auto",
                kc: KernelConfig = PLAIN, sparse: SparseConfig | None = None, shard=None):
    """Allocates the model on `device` in `dtype` without initialising weights (the loader fills them); its
    layers bind the implementations `kc` chooses, and attend sparsely as `sparse` says when it is given.
    shard (layers/parallel.py): this rank's part of a model split over a tensor-parallel group."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if shard is not None and shard.size > 1:
                if cfg.model_type not in ("deepseek_v2", "deepseek_v3"):
                    raise ValueError(f"tensor parallelism does not support {cfg.model_type} models yet")
                return ParallelDeepseekForCausalLM(cfg, mla_mode, kc, shard).eval()
            model = MODEL_CLASSES[cfg.model_type](cfg, mla_mode, kc).eval()
            for layer in model.model.layers if sparse else ():  # same weight names, so the loader fills them
                layer.self_attn = BlockSparseMLA(cfg, mla_mode, model.model.rotary, kc, sparse)
            return model
    finally:
        torch.set_default_dtype(previous)


def load_model(path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, mla_mode: str, kc: KernelConfig,
               quantization: str | None = None, group_size: int | None = None, map_embeddings: bool = True,
               sparse: SparseConfig | None = None, shard=None):
    """The model built and filled from the checkpoint at `path`: (model, bits per quantized unit or None,
    MTP tensors the model does not use). Quantized weights become empty QTensors before the loader fills
    them, so no full-precision copy of a quantized matrix is ever made."""
    model = build_model(cfg, dtype, device, mla_mode, kc, sparse, shard)
    bits = quant_plan.prepare(model, path, quantization, group_size, map_embeddings)
    malloc.advise_hugepages(quant_plan.weight_tensors(model))  # before the loader first writes them
    mtp = load_weights(model, path)
    if isinstance(model, ParallelDeepseekForCausalLM):
        model.drop_replicated_biases()
        model.fused = ParallelFusedDecoder.build(model)  # a collective: every rank loads, then agrees
    malloc.trim()  # loading's temporaries leave the heap fragmented (dsinfer/malloc.py)
    return model, bits, mtp
