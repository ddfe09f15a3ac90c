"""A decode batch through each decoder layer in one C call (kernels/decode_layer.c) instead of the Python layers.

A decode step of a small model is dispatch, not arithmetic: each layer is some forty torch ops and kernel calls
of a few microseconds each. The decoder holds every layer's weight pointers and shapes (taken once, after
loading; weights do not move after that), and a step passes only its own inputs. It takes models on CPU whose
matrices are fp32, bf16 or int8 / int4 codes (kernels/decode_layer.h), without projection biases or GPTQ column
permutations, and steps of decodes only (no prefill chunk) of at most step_tokens (16: a decode of up to 16
sequences); the runner sends every other step to the Python layers, which are its reference (a speculative
engine sends larger decode steps here in chunks). The
latent cache may be fp32, bf16 or fp8 (layers/kv_format.py): the C layer writes and reads each format."""
from dataclasses import replace

import torch

from dsinfer import kernels
from dsinfer.kernels.lib import l2_bytes
from dsinfer.kernels.decode_layer import CACHE_FORMATS, WEIGHT_FORMATS, LayerC, MatC, StepC, run_attention, run_ffn, \
    run_layer
from dsinfer.layers.attention import AttentionMetadata
from dsinfer.layers.moe import MoE
from dsinfer.quant.qtensor import QTensor


def cpu_caches(caches: list[torch.Tensor]) -> bool:
    """Contiguous CPU caches of one format the C layer knows (fp32, bf16, or fp8 as uint8 rows)."""
    formats = {str(c.dtype).removeprefix("torch.") for c in caches}
    return (len(formats) == 1 and formats <= set(CACHE_FORMATS)
            and all(c.device.type == "cpu" and c.is_contiguous() for c in caches))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _cpu(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()


def decode_step(rotary, positions, meta: AttentionMetadata, cache: torch.Tensor, tokens: int) -> tuple[StepC, list]:
    """The StepC of a decode step of `tokens` tokens into caches like `cache`, and the tensors it points to
    (keep them while the step runs)."""
    cs, lens = torch.view_as_real(rotary.rotation(positions)), positions + 1
    index = [t.contiguous() for t in (meta.slot_mapping, meta.gather_index, meta.token_seq)]
    fmt = CACHE_FORMATS[str(cache.dtype).removeprefix("torch.")]
    step = StepC(tokens, index[1].shape[0], index[1].shape[1], cache.shape[0], fmt, cs.data_ptr(),
                 *(t.data_ptr() for t in index), lens.data_ptr())
    return step, [cs, lens, *index]


class StepCache:
    """The last decode step's StepC (decode_step), found again by the identity of its positions and metadata: a
    second decoder run over the same tokens (the MTP draft layer after the main model, in speculative decoding)
    reuses it, as the layers reuse the step's rotation. Shared by the decoders that write one KVCache."""
    __slots__ = ("key", "value")

    def __init__(self):
        self.key = self.value = None

    def get(self, rotary, positions, meta: AttentionMetadata, cache: torch.Tensor, tokens: int) -> tuple[StepC, list]:
        if self.key is not None and self.key[0] is positions and self.key[1] is meta:
            return self.value
        self.key, self.value = None, decode_step(rotary, positions, meta, cache, tokens)
        self.key = (positions, meta)
        return self.value


def decode_slice(meta: AttentionMetadata, start: int, size: int) -> AttentionMetadata:
    """The metadata of a decode step's tokens start .. start + size - 1 (every sequence's rows kept). Chunks
    run in order, so a token still sees the cache rows its sequence's earlier tokens wrote."""
    end = start + size
    return replace(meta, slot_mapping=meta.slot_mapping[start:end], token_seq=meta.token_seq[start:end])


class LayerBuilder:
    """Fills LayerC structs. Weights are used where they lie; vectors (norms, the router's bias) are read as fp32
    copies that the builder keeps alive. int8_kernel: the model's KernelConfig.int8_kernel; token_parallel: its
    switch of that name, which splits a step's tokens among the threads in a layer whose token reads no more than
    one core's L2 cache holds, of fp32 / bf16 weights only (their kernels give a row the same bits whatever the
    batch; the integer kernels' sums depend on it in the last bits); wide: its wide_steps, which reads fp32 / bf16
    weights once for up to 16 tokens (MatC.wide)."""

    def __init__(self, int8_kernel: int, token_parallel: bool = False, wide: bool = False):
        self.int8, self.keep, self.token_parallel, self.wide = int8_kernel, [], token_parallel, int(wide)

    def mat(self, w, values_only: bool = False) -> MatC | None:
        """A matrix in a format the C layer reads: fp32 or bf16 values, or int8 / int4 codes (no GPTQ column
        permutation); None otherwise."""
        if isinstance(w, QTensor):
            if values_only or w.perm is not None or not all(map(_cpu, (w.q, w.scales))) or \
                    (w.mins is not None and not _cpu(w.mins)) or w.scales.dtype != torch.float32:
                return None
            int8_x = self.int8 if kernels.int8_activations_fit(w.bits, w.k, w.group_size) else 0
            return MatC(w.q.data_ptr(), w.scales.data_ptr(), _ptr(w.mins), WEIGHT_FORMATS[w.bits], w.group_size,
                        int8_x, 0)
        fmt = WEIGHT_FORMATS.get(str(getattr(w, "dtype", "")).removeprefix("torch."))
        return None if fmt is None or not _cpu(w) else MatC(w.data_ptr(), None, None, fmt, 0, 0, self.wide)

    def vec(self, t: torch.Tensor | None):
        """An fp32 copy of a small vector (or None), kept alive with the builder."""
        if t is None:
            return None
        self.keep.append(t.detach().float().contiguous())
        return self.keep[-1].data_ptr()

    def attention(self, attn) -> dict | None:
        """MLA's shapes and weights, or None where the fused layer cannot take it."""
        q_lora = hasattr(attn, "q_a_proj")
        q_b = attn.q_b_proj if q_lora else attn.q_proj
        linears = [q_b, attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj] + ([attn.q_a_proj] if q_lora else [])
        mats = dict(q_b=self.mat(q_b.weight), kv_a=self.mat(attn.kv_a_proj_with_mqa.weight),
                    kv_b=self.mat(attn.kv_b_proj.weight, values_only=True), o=self.mat(attn.o_proj.weight),
                    q_a=self.mat(attn.q_a_proj.weight) if q_lora else MatC())
        if any(m.bias is not None for m in linears) or None in mats.values() or attn.dr % 2 \
                or attn.mode == "decompressed":  # the fused layer runs decode absorbed, as the auto mode does
            return None
        return dict(h=attn.h, dn=attn.dn, dr=attn.dr, dv=attn.dv, r=attn.r, scale=attn.scale,
                    eps=attn.kv_a_layernorm.eps, qr=attn.q_a_proj.weight.shape[0] if q_lora else 0,
                    q_a_norm=self.vec(attn.q_a_layernorm.weight) if q_lora else None,
                    kv_norm=self.vec(attn.kv_a_layernorm.weight), **mats)

    def ffn(self, mlp) -> dict | None:
        """The MoE's or dense MLP's shapes and weights, or None where the fused layer cannot take it."""
        if not isinstance(mlp, MoE):
            gate_up, down = self.mat(mlp.gate_up_proj), self.mat(mlp.down_proj)
            return None if gate_up is None or down is None else \
                dict(experts=0, gate_up=gate_up, down=down, inter=mlp.inter)
        g, ex, sh = mlp.gate, mlp.experts, mlp.shared_experts
        mats = dict(gate_up=self.mat(ex.gate_up_proj), down=self.mat(ex.down_proj),
                    sh_gate_up=self.mat(sh.gate_up_proj) if sh else MatC(), sh_down=self.mat(sh.down_proj) if sh else MatC())
        router_fmt = WEIGHT_FORMATS.get(str(g.weight.dtype).removeprefix("torch."))
        if None in mats.values() or router_fmt not in (0, 1) or not _cpu(g.weight) or g.top_k > 64:
            return None
        total = getattr(ex, "total", ex.n)  # an expert-parallel rank's slice (layers/parallel.ExpertSlice)
        return dict(experts=total, first_expert=getattr(ex, "first", 0), local_experts=ex.n, top_k=g.top_k,
                    n_group=g.n_group, topk_group=g.topk_group,
                    method=kernels.ROUTE_METHODS[g.method], sigmoid=int(g.scoring == "sigmoid"),
                    norm_topk=int(g.norm_topk_prob), route_scale=g.scale, router=_ptr(g.weight),
                    router_bf16=router_fmt, bias=self.vec(g.e_score_correction_bias), inter=ex.inter,
                    sh_inter=sh.inter if sh else 0, counts=_ptr(mlp.expert_counts), **mats)

    def layer(self, layer, d: int) -> LayerC | None:
        attn, ffn = self.attention(layer.self_attn), self.ffn(layer.mlp)
        if attn is None or ffn is None:
            return None
        values = all(m.format in (0, 1) for m in (*attn.values(), *ffn.values()) if isinstance(m, MatC) and m.w)
        small = self.token_parallel and values and token_bytes(layer) <= l2_bytes()
        return LayerC(d=d, in_norm=self.vec(layer.input_layernorm.weight),
                      post_norm=self.vec(layer.post_attention_layernorm.weight), token_parallel=int(small),
                      **attn, **ffn)


def token_bytes(layer) -> int:
    """The weight bytes one token reads in a decoder layer: all of it but the routed experts it does not choose."""
    total = sum(nbytes(p) for p in layer.parameters()) + \
        sum(nbytes(v) for m in layer.modules() for v in vars(m).values() if isinstance(v, QTensor))
    experts = getattr(layer.mlp, "experts", None)
    if experts is None:
        return total
    routed = nbytes(experts.gate_up_proj) + nbytes(experts.down_proj)
    return total - routed + routed * layer.mlp.gate.top_k // experts.n


def nbytes(w) -> int:
    """A tensor's bytes, or a QTensor's (codes, scales and mins)."""
    if isinstance(w, QTensor):
        return sum(nbytes(t) for t in (w.q, w.scales, w.mins) if t is not None)
    return w.numel() * w.element_size()


class FusedDecoder:
    """The model's decode step with each layer one C call: embedding, the layers, the final norm."""

    def __init__(self, model, layers: list[LayerC], caches: list[torch.Tensor], keep: list[torch.Tensor]):
        self.model, self.layers, self.caches, self.lib = model.model, layers, caches, kernels.library()
        self.keep = keep  # the fp32 vectors the layers point to
        self.step_tokens = self.lib.decode_step_tokens()  # the most tokens one C call takes (chunked steps)
        self.cache_format = CACHE_FORMATS[str(caches[0].dtype).removeprefix("torch.")]
        self.steps = StepCache()

    @classmethod
    def build(cls, model, caches: list[torch.Tensor]) -> "FusedDecoder | None":
        """The decoder for a loaded model whose KernelConfig asks for it, writing into `caches` (one per layer),
        or None if it does not ask or if any layer or cache cannot take the fused path."""
        if not model.kernel_config.fused_decode or kernels.library() is None or not cpu_caches(caches):
            return None
        if getattr(model, "shard", None) is not None:  # a rank's model runs its own (models/parallel_fused.py)
            return None
        kc = model.kernel_config
        builder = LayerBuilder(kc.int8_kernel, kc.token_parallel, kc.wide_steps)
        layers = [builder.layer(layer, model.config.hidden_size) for layer in model.model.layers]
        return None if any(s is None for s in layers) else cls(model, layers, caches, builder.keep)

    @staticmethod
    def decode_only(num_tokens: int, meta: AttentionMetadata, most: int) -> bool:
        return meta.num_prefills == 0 and 0 < num_tokens <= most

    def takes(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        """Whether a step fits one call: decodes only, at most step_tokens of them (a decode of up to 16
        sequences; larger speculative steps take step_tokens at a time)."""
        return self.decode_only(num_tokens, meta, self.step_tokens)

    @classmethod
    def build_layer(cls, model, layer, cache: torch.Tensor,
                    main: "FusedDecoder | None" = None) -> "FusedDecoder | None":
        """One more decoder layer of `model` (the MTP draft layer) alone, writing into its own `cache`, for
        run_layers; None where the model's KernelConfig or the layer or cache cannot take the fused path.
        main: the model's own decoder over caches of the same rows and format, whose steps this one reuses
        (their StepCache) where they are over the same positions and metadata."""
        if not model.kernel_config.fused_decode or kernels.library() is None or not cpu_caches([cache]):
            return None
        builder = LayerBuilder(model.kernel_config.int8_kernel, wide=model.kernel_config.wide_steps)
        struct = builder.layer(layer, model.config.hidden_size)
        if struct is None:
            return None
        decoder = cls(model, [struct], [cache], builder.keep)
        if main is not None and main.caches[0].shape == cache.shape and main.caches[0].dtype == cache.dtype:
            decoder.steps = main.steps
        return decoder

    def __call__(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.norm(self.run_layers(self.model.embed(input_ids), positions, meta))

    def run_layers(self, x: torch.Tensor, positions, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden] through every layer; returns the result in x's dtype."""
        caches = self.caches
        dtype, x = x.dtype, x.float().contiguous()  # the C layer keeps the residual stream in fp32
        step, _kept = self.steps.get(self.model.rotary, positions, meta, caches[0], x.shape[0])
        threads = torch.get_num_threads()
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            code = run_layer(self.lib, layer, step, x.data_ptr(), cache.data_ptr(), threads)
            if code:
                raise RuntimeError(f"fused decode layer {i} failed with code {code} (see kernels/decode_layer.c)")
        return x.to(dtype)

    def run_rows(self, x: torch.Tensor, positions, meta: AttentionMetadata, keep: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] through this decoder's one layer (build_layer), for rows `keep` only: the attention half
        of every row (which writes its cache row), the MoE / MLP half of those rows alone. They come out with
        the numbers run_layers gives them (the same fp32 adds)."""
        (layer,), (cache,) = self.layers, self.caches
        dtype, x = x.dtype, x.float().contiguous()
        step, _kept = self.steps.get(self.model.rotary, positions, meta, cache, x.shape[0])
        part, threads = torch.empty_like(x), torch.get_num_threads()
        check_rows(run_attention(self.lib, layer, step, x.data_ptr(), cache.data_ptr(), part.data_ptr(), threads),
                   keep)
        x = (x + part).index_select(0, keep)
        if not len(keep):  # the cache rows alone
            return x.to(dtype)
        rows = StepC.from_buffer_copy(step)
        rows.t = x.shape[0]  # the MoE / MLP half reads only the token count
        part = torch.empty_like(x)
        check_rows(run_ffn(self.lib, layer, rows, x.data_ptr(), part.data_ptr(), threads), keep)
        return (x + part).to(dtype)


def check_rows(code: int, keep: torch.Tensor):
    if code:
        raise RuntimeError(f"fused decode layer (rows {keep.tolist()}) failed with code {code} "
                           "(see kernels/decode_layer.c)")
