"""DeepSeek's multi-token-prediction (MTP) layer, `model.layers.{num_hidden_layers}` of a V3 checkpoint, as a
draft model for speculative decoding.

At position i it takes the main model's final hidden state h_i and the next token t_{i+1}:
    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])      (embedding first)
    y = decoder layer(x)                                  (MLA over its own latent cache, then MoE or MLP)
    logits = head(shared_head.norm(y))                    (embedding and head are the main model's)
and predicts t_{i+2}. Drafting more than one token reuses the layer with its own normed output in place of h.

A draft only has to be likely, never exact (the main model verifies it), so the layer's matrices and a copy of
the head may be quantized for drafting (quantize_draft): a draft step then reads a quarter of the bytes (int8
codes of fp32 weights), which on CPU is most of its cost."""
import functools
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
from dsinfer.kernels.decode_layer import DraftC, run_draft
from dsinfer.models.fused_decode import FusedDecoder, LayerBuilder, decode_slice
from dsinfer.models.loader import CheckpointError, checkpoint_views, fill
from dsinfer.models.quant_plan import group_size_for, quantize_unit, units
from dsinfer.quant.qtensor import QTensor

SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's, in V3 checkpoints
DRAFT_BITS = {"int8": 8, "int4": 4}  # spec_draft_quantization
DRAFT_ERRORS = {1: "bad sizes or no memory", 3: "a next token id outside the embedding table",
                4: "a kept row outside the batch"}  # decode_draft_f32's codes; 100 + n: the decoder layer's n


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
        self.draft_head: QTensor | None = None  # quantize_draft: a quantized copy of the main model's head

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, cache: torch.Tensor, fused: "FusedDraft | None" = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """next_ids [T] (t_{i+1}), hidden [T, d] (h_i) at positions [T] -> normed output [T, d], which is both
        what the head takes and the next draft step's h; only rows `keep` of it where given (every row's cache
        row is written). fused: this layer's decode steps with the C kernels (FusedDraft.build over `cache`),
        taken for the steps it fits; it skips the MoE / MLP of the rows not kept."""
        if fused is not None and fused.decoder.takes(next_ids.shape[0], meta):
            return fused(next_ids, hidden, positions, meta, keep)
        if fused is not None and fused.chunk_decodes and meta.num_prefills == 0:
            out = fused.in_chunks(next_ids, hidden, positions, meta)
            return out if keep is None else out.index_select(0, keep)
        e = self.enorm(self.main[0].model.embed(next_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden.to(e.dtype))], -1))
        out = self.shared_head.norm(super().forward(x, positions, meta, cache))
        return out if keep is None else out.index_select(0, keep)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's logits: the main model's head, or its quantized copy (quantize_draft)."""
        if self.draft_head is None:
            return self.main[0].compute_logits(hidden)
        return self.main[0].matmul(hidden.float(), self.draft_head)


def quantize_draft(layer: MTPLayer, quantization: str):
    """Quantizes, for drafting only, the loaded MTP layer's matrices (those quant_plan quantizes in a model: all
    but kv_b_proj, the router and the norms) and a copy of the main model's head, to int8 (one scale per row) or
    int4 (groups of 128), symmetric round to nearest."""
    if quantization not in DRAFT_BITS:
        raise ValueError(f"spec_draft_quantization must be one of {tuple(DRAFT_BITS)} or None, got {quantization!r}")
    bits = DRAFT_BITS[quantization]
    for unit in units(layer):
        if not isinstance(unit.weight, QTensor):
            quantize_unit_now(unit, bits)
    main = layer.main[0]
    head = main.model.embed_tokens if main.lm_head is None else main.lm_head.weight
    if not isinstance(head, QTensor):
        layer.draft_head = quantized_copy(head.detach(), bits)


def quantize_unit_now(unit, bits: int):
    dense = unit.weight.detach()
    quantize_unit(unit, bits, None)
    unit.weight.store(dense)


def quantized_copy(w: torch.Tensor, bits: int) -> QTensor:
    q = QTensor.empty(tuple(w.shape), bits, group_size_for(bits, None, w.shape[-1]), w.device)
    q.store(w)
    return q


class FusedDraft:
    """The MTP layer's decode-sized steps with the C kernels, in fp32 activations from end to end: the norms in
    the fp32 kernel (weights copied to fp32 once), eh_proj in the weight-streaming kernel, the decoder layer in
    one C call (FusedDecoder). A handful of calls a step in place of the modules' dispatch; with fp32 weights the
    numbers are those of the Python layers with the kernels, with bf16 weights they skip the bf16 roundings of
    the activations (drafts only: what the main model verifies is unchanged)."""

    def __init__(self, mtp: MTPLayer, decoder: FusedDecoder, chunk_decodes: bool = True):
        """chunk_decodes: decode steps of more than kernels.MAX_M tokens (catch-ups of 8 streams) run here too, in
        chunks of the decoder's step_tokens, instead of through the Python layer."""
        self.mtp, self.decoder, self.eps, self.chunk_decodes = mtp, decoder, mtp.enorm.eps, chunk_decodes
        norms = (mtp.enorm, mtp.hnorm, mtp.shared_head.norm)
        self.enorm, self.hnorm, self.out_norm = (n.weight.detach().float().contiguous() for n in norms)
        main = mtp.main[0]
        self.table, kc = main.model.embed_tokens, main.kernel_config
        int8 = kc.int8_kernel
        self.eh_proj = bound_matmul(mtp.eh_proj.weight, int8)
        head = mtp.draft_head if mtp.draft_head is not None else \
            main.model.embed_tokens if main.lm_head is None else main.lm_head.weight
        self.head = bound_matmul(head, int8)
        self.struct = self.draft_struct(head, LayerBuilder(int8, wide=kc.wide_steps))

    def draft_struct(self, head, mats: LayerBuilder) -> DraftC | None:
        """The DraftC of decode_draft.c for this layer, or None where its embedding table or matrices are not in a
        format the C call reads."""
        eh_proj, head_c, table = mats.mat(self.mtp.eh_proj.weight), mats.mat(head), self.table
        if eh_proj is None or head_c is None or not isinstance(table, torch.Tensor) or not table.is_contiguous() \
                or table.device.type != "cpu" or table.dtype not in (torch.float32, torch.bfloat16) \
                or tuple(head.shape) != tuple(table.shape):
            return None
        return DraftC(table.shape[1], table.shape[0], int(table.dtype == torch.bfloat16), self.eps,
                      self.enorm.data_ptr(), self.hnorm.data_ptr(), self.out_norm.data_ptr(), table.data_ptr(),
                      eh_proj, head_c)

    def takes_one_call(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        return self.struct is not None and meta.num_prefills == 0 and 0 < num_tokens <= self.decoder.step_tokens

    def one_call(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As __call__ followed by logits, in one C call (decode_draft.c; takes_one_call says where it applies):
        the normed output [kept, d] fp32 and the head's logits [kept, vocab] fp32."""
        (layer,), (cache,) = self.decoder.layers, self.decoder.caches
        t, d = next_ids.shape[0], self.struct.d
        step, _kept = self.decoder.steps.get(self.decoder.model.rotary, positions, meta, cache, t)
        ids = next_ids.to(torch.int64).contiguous()
        hidden = (hidden if hidden.dtype == torch.bfloat16 else hidden.float()).contiguous()
        keep = None if keep is None else keep.to(torch.int64).contiguous()
        rows = t if keep is None else keep.shape[0]
        out, logits = torch.empty(rows, d), torch.empty(rows, self.struct.vocab)
        code = run_draft(self.decoder.lib, self.struct, layer, step, ids.data_ptr(), hidden.data_ptr(),
                         hidden.dtype == torch.bfloat16, None if keep is None else keep.data_ptr(),
                         -1 if keep is None else rows, cache.data_ptr(), out.data_ptr(), logits.data_ptr(),
                         torch.get_num_threads())
        if code:
            raise RuntimeError(f"fused draft layer failed: {DRAFT_ERRORS.get(code, f'code {code}')} "
                               "(see kernels/decode_draft.c)")
        return out, logits

    @classmethod
    def build(cls, main, mtp: MTPLayer, cache: torch.Tensor, main_decoder: FusedDecoder | None = None,
              chunk_decodes: bool = True) -> "FusedDraft | None":
        """None where the main model's KernelConfig, the layer or the cache cannot take the fused path.
        main_decoder: the main model's, whose step inputs a draft over the same positions reuses."""
        decoder = FusedDecoder.build_layer(main, mtp, cache, main_decoder)
        if decoder is None or mtp.eh_proj.bias is not None:
            return None
        draft = cls(mtp, decoder, chunk_decodes)
        return None if draft.eh_proj is None else draft

    def in_chunks(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        """A decode step of any size, the decoder's step_tokens at a time, in order (a token still sees the cache rows
        its sequence's earlier tokens wrote), each chunk with every sequence's rows."""
        n = self.decoder.step_tokens
        return torch.cat([self(next_ids[a:a + n], hidden[a:a + n], positions[a:a + n], decode_slice(meta, a, n))
                          for a in range(0, next_ids.shape[0], n)])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MTPLayer.compute_logits, with the head's kernel bound once for this layer's fp32 outputs."""
        if self.head is None or hidden.dtype != torch.float32 or not 0 < hidden.shape[0] <= kernels.MAX_M:
            return self.mtp.compute_logits(hidden)
        return self.head(hidden.contiguous())

    def __call__(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, keep: torch.Tensor | None = None) -> torch.Tensor:
        """As MTPLayer.forward: normed output [T, d] (rows `keep` where given), fp32."""
        e = kernels.rms_norm(embed(next_ids, self.table).float(), self.enorm, self.eps)
        h = kernels.rms_norm(hidden.float(), self.hnorm, self.eps)
        x = self.eh_proj(torch.cat([e, h], -1))
        y = self.decoder.run_layers(x, positions, meta) if keep is None else \
            self.decoder.run_rows(x, positions, meta, keep)
        return kernels.rms_norm(y, self.out_norm, self.eps)


def bound_matmul(w, int8_kernel: int):
    """x fp32 contiguous [M, K] -> x @ w.T in fp32, as the model's Matmul computes it, with the kernel chosen and
    w checked once: gemv for fp32 / bf16 values, qgemv_for for int8 / int4 codes (int8 activations where the
    KernelConfig and the shape allow), MAX_M rows of x at a time; None where neither takes w."""
    if isinstance(w, QTensor):
        if w.perm is not None or w.device.type != "cpu":
            return None
        int8 = int8_kernel if kernels.int8_activations_fit(w.bits, w.k, w.group_size) else 0
        kernel = kernels.qgemv_for(w.q, w.scales, w.mins, w.bits, w.group_size, w.k, int8)
        return functools.partial(kernels.in_row_chunks, kernel)
    fits = isinstance(w, torch.Tensor) and w.dim() == 2 and kernels.usable(torch.empty(1, w.shape[1]), w)
    return functools.partial(kernels.in_row_chunks, functools.partial(kernels.gemv, w=w)) if fits else None


def mtp_prefix(cfg: ModelConfig) -> str:
    return f"model.layers.{cfg.num_hidden_layers}."


def load_mtp(main, path, mtp_tensors: dict[str, str], dtype: torch.dtype, device, mla_mode: str,
             kc: KernelConfig, quantization: str | None = None) -> MTPLayer:
    """The checkpoint's first MTP layer, built beside the loaded `main` model and filled from `path`; its
    weights stay in `dtype` (the main model's quantization does not apply), or are quantized for drafting with
    `quantization` (quantize_draft). A checkpoint without one is a CheckpointError naming what is missing."""
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
    if quantization is not None:
        quantize_draft(layer, quantization)
    return layer
