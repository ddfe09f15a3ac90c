"""The fused decode layer (kernels/decode_layer.c) on a rank of a tensor-parallel group. Each layer is two C
calls on this rank's shards, as the Python layers of models/parallel_model.py split it: the attention half (its
heads of q_b / kv_b / o_proj, the latent projections whole) and the MoE / MLP half (its intermediate slice, or
under expert parallelism its experts, routed among all of them; the others' are skipped). Each half returns its
partial sum without the residual; the all-reduce between them runs in torch.distributed, and the residual is
added once, to the sum. The math is the C layer's, which is the Python layers'.

Every rank must take the same path at every step, since the two paths make different collectives: whether the
ranks have the fused path is agreed once, by all of them, after loading; whether a step takes it depends only on
the step's inputs and the caches' format, which every rank shares."""
import torch

from dsinfer import kernels
from dsinfer.kernels.decode_layer import run_attention, run_ffn
from dsinfer.layers.attention import AttentionMetadata
from dsinfer.models.fused_decode import FusedDecoder, LayerBuilder, cpu_caches, decode_step


class ParallelFusedDecoder:
    """A rank's decode step: the embedding (split by vocabulary, all-reduced), each layer's two halves with an
    all-reduce after each, the final norm."""

    def __init__(self, model, layers: list, keep: list[torch.Tensor]):
        self.model, self.shard, self.layers, self.lib = model.model, model.shard, layers, kernels.library()
        self.keep = keep  # the fp32 vectors the layers point to

    @classmethod
    def build(cls, model) -> "ParallelFusedDecoder | None":
        """Collective, on every rank after loading: the decoder, or None on every rank if any rank's
        KernelConfig does not ask for it or any rank's layers cannot take the fused path."""
        kc, layers = model.kernel_config, None
        builder = LayerBuilder(kc.int8_kernel, wide=kc.wide_steps)
        if kc.fused_decode and kernels.library() is not None:
            layers = [builder.layer(layer, model.config.hidden_size) for layer in model.model.layers]
        fits = layers is not None and None not in layers
        device = model.model.norm.weight.device
        return cls(model, layers, builder.keep) if model.shard.all_agree(fits, device) else None

    @staticmethod
    def takes(num_tokens: int, meta: AttentionMetadata, caches: list[torch.Tensor]) -> bool:
        """Whether a step fits: decodes only, at most kernels.MAX_M tokens, caches the C layer reads."""
        return FusedDecoder.decode_only(num_tokens, meta, kernels.MAX_M) and cpu_caches(caches)

    def __call__(self, input_ids, positions, meta: AttentionMetadata, caches: list[torch.Tensor]) -> torch.Tensor:
        x = self.model.embed(input_ids)
        dtype, x = x.dtype, x.float().contiguous()  # the residual stream in fp32, as in one process
        step, _kept = decode_step(self.model.rotary, positions, meta, caches[0], x.shape[0])
        part, threads = torch.empty_like(x), torch.get_num_threads()
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            check(i, "attention", run_attention(self.lib, layer, step, x.data_ptr(), cache.data_ptr(),
                                                part.data_ptr(), threads))
            x += self.shard.all_reduce(part)
            check(i, "MoE / MLP", run_ffn(self.lib, layer, step, x.data_ptr(), part.data_ptr(), threads))
            x += self.shard.all_reduce(part)
        return self.model.norm(x.to(dtype))


def check(layer: int, half: str, code: int):
    if code:
        raise RuntimeError(f"fused decode layer {layer} ({half} half) failed with code {code} "
                           "(see kernels/decode_layer.c)")
