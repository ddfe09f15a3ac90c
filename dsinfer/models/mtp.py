"""DeepSeek's multi-token-prediction (MTP) layer, `model.layers.{num_hidden_layers}` of a V3 checkpoint, as a
draft model for speculative decoding.

At position i it takes the main model's final hidden state h_i and the next token t_{i+1}:
    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])      (embedding first)
    y = decoder layer(x)                                  (MLA over its own latent cache, then MoE or MLP)
    logits = head(shared_head.norm(y))                    (embedding and head are the main model's)
and predicts t_{i+2}. Drafting more than one token reuses the layer with its own normed output in place of h."""
from pathlib import Path

import torch

from dsinfer.config import ModelConfig
from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.attention import AttentionMetadata
from dsinfer.layers.linear import Linear
from dsinfer.layers.norm import RMSNorm
from dsinfer.layers.embedding import embed
from dsinfer.models.deepseek import DecoderLayer
from dsinfer.models.fused_decode import FusedDecoder
from dsinfer.models.loader import CheckpointError, checkpoint_views, fill

SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's, in V3 checkpoints


class MTPLayer(DecoderLayer):
    """The decoder layer's weights under the same names as the checkpoint's, plus enorm, hnorm, eh_proj and
    shared_head.norm."""

    def __init__(self, main, mla_mode: str, kc: KernelConfig):
        cfg: ModelConfig = main.config
        super().__init__(cfg, cfg.num_hidden_layers, mla_mode, main.model.rotary, kc)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm, self.hnorm = RMSNorm(d, eps, kc), RMSNorm(d, eps, kc)
        self.eh_proj = Linear(2 * d, d, bias=False, kc=kc)
        self.shared_head = torch.nn.Module()
        self.shared_head.norm = RMSNorm(d, eps, kc)
        self.main = [main]  # in a list: not a submodule (its weights are not the MTP layer's)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, cache: torch.Tensor, fused: "FusedDraft | None" = None) -> torch.Tensor:
        """next_ids [T] (t_{i+1}), hidden [T, d] (h_i) at positions [T] -> normed output [T, d], which is both
        what the head takes and the next draft step's h. fused: this layer's decode steps with the C kernels
        (FusedDraft.build over `cache`), taken for the steps it fits."""
        if fused is not None and fused.decoder.takes(next_ids.shape[0], meta):
            return fused(next_ids, hidden, positions, meta)
        e = self.enorm(self.main[0].model.embed(next_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden.to(e.dtype))], -1))
        return self.shared_head.norm(super().forward(x, positions, meta, cache))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.main[0].compute_logits(hidden)


class FusedDraft:
    """The MTP layer's decode-sized steps with the C kernels, in fp32 activations from end to end: the norms in
    the fp32 kernel (weights copied to fp32 once), eh_proj in the weight-streaming kernel, the decoder layer in
    one C call (FusedDecoder). A handful of calls a step in place of the modules' dispatch; with fp32 weights the
    numbers are those of the Python layers with the kernels, with bf16 weights they skip the bf16 roundings of
    the activations (drafts only: what the main model verifies is unchanged)."""

    def __init__(self, mtp: MTPLayer, decoder: FusedDecoder):
        self.mtp, self.decoder, self.eps = mtp, decoder, mtp.enorm.eps
        norms = (mtp.enorm, mtp.hnorm, mtp.shared_head.norm)
        self.enorm, self.hnorm, self.out_norm = (n.weight.detach().float().contiguous() for n in norms)
        self.eh_proj = mtp.eh_proj.weight

    @classmethod
    def build(cls, main, mtp: MTPLayer, cache: torch.Tensor) -> "FusedDraft | None":
        """None where the main model's KernelConfig, the layer or the cache cannot take the fused path."""
        decoder = FusedDecoder.build_layer(main, mtp, cache)
        w = mtp.eh_proj.weight
        if decoder is None or mtp.eh_proj.bias is not None or not isinstance(w, torch.Tensor) \
                or not kernels.usable(torch.empty(1, w.shape[1]), w):
            return None
        return cls(mtp, decoder)

    def __call__(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """As MTPLayer.forward: normed output [T, d], fp32."""
        e = kernels.rms_norm(embed(next_ids, self.mtp.main[0].model.embed_tokens).float(), self.enorm, self.eps)
        h = kernels.rms_norm(hidden.float(), self.hnorm, self.eps)
        x = kernels.gemv(torch.cat([e, h], -1), self.eh_proj)
        return kernels.rms_norm(self.decoder.run_layers(x, positions, meta), self.out_norm, self.eps)


def mtp_prefix(cfg: ModelConfig) -> str:
    return f"model.layers.{cfg.num_hidden_layers}."


def load_mtp(main, path, mtp_tensors: dict[str, str], dtype: torch.dtype, device, mla_mode: str,
             kc: KernelConfig) -> MTPLayer:
    """The checkpoint's first MTP layer, built beside the loaded `main` model and filled from `path`; its
    weights stay in `dtype` (not quantized on load). A checkpoint without one is a CheckpointError naming what
    is missing."""
    cfg, prefix = main.config, mtp_prefix(main.config)
    ours = {n: f for n, f in mtp_tensors.items() if n.startswith(prefix) and n[len(prefix):] not in SHARED}
    if not cfg.num_nextn_predict_layers or not ours:
        raise CheckpointError(
            f"speculative decoding with method 'mtp' needs the checkpoint's MTP layer: tensors {prefix}* "
            f"(enorm, hnorm, eh_proj, a decoder layer, shared_head.norm) and num_nextn_predict_layers >= 1 in "
            f"config.json; {path} has num_nextn_predict_layers = {cfg.num_nextn_predict_layers} and "
            f"{len(ours)} such tensors")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            layer = MTPLayer(main, mla_mode, kc).eval()
    finally:
        torch.set_default_dtype(previous)
    fill(checkpoint_views(layer, prefix), Path(path), ours, cfg)
    return layer
