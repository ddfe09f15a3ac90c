"""A decode batch through each decoder layer in one C call (kernels/decode_layer.c) instead of the Python layers.

A decode step of a small model is dispatch, not arithmetic: each layer is some forty torch ops and kernel calls
of a few microseconds each. The decoder holds every layer's weight pointers and shapes (taken once, after
loading; weights do not move after that), and a step passes only its own inputs. It takes models whose layers
are all fp32 on CPU without projection biases, and steps of decodes only (no prefill chunk) of at most
kernels.MAX_M tokens; the runner sends every other step to the Python layers, which are its reference. The
latent cache may be fp32, bf16 or fp8 (layers/kv_format.py): the C layer writes and reads each format."""
import torch

from dsinfer import kernels
from dsinfer.kernels.decode_layer import CACHE_FORMATS, LayerC, StepC, run_layer
from dsinfer.layers.attention import AttentionMetadata
from dsinfer.layers.moe import MoE


def _fp32(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
               and t.is_contiguous() for t in tensors)


def _cpu_caches(caches: list[torch.Tensor]) -> bool:
    """Contiguous CPU caches of one format the C layer knows (fp32, bf16, or fp8 as uint8 rows)."""
    formats = {str(c.dtype).removeprefix("torch.") for c in caches}
    return (len(formats) == 1 and formats <= set(CACHE_FORMATS)
            and all(c.device.type == "cpu" and c.is_contiguous() for c in caches))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def attention_fields(attn) -> dict | None:
    """MLA's shapes and weight pointers, or None where the fused layer cannot take it."""
    q_lora = hasattr(attn, "q_a_proj")
    q_b = attn.q_b_proj if q_lora else attn.q_proj
    linears = [q_b, attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj] + ([attn.q_a_proj] if q_lora else [])
    norms = [attn.kv_a_layernorm] + ([attn.q_a_layernorm] if q_lora else [])
    if any(m.bias is not None for m in linears) or not _fp32(*(m.weight for m in linears + norms)) or attn.dr % 2 \
            or attn.mode == "decompressed":  # the fused layer runs decode absorbed, as the auto mode does
        return None
    return dict(h=attn.h, dn=attn.dn, dr=attn.dr, dv=attn.dv, r=attn.r, scale=attn.scale, eps=attn.kv_a_layernorm.eps,
                qr=attn.q_a_proj.weight.shape[0] if q_lora else 0, q_a=_ptr(attn.q_a_proj.weight) if q_lora else None,
                q_a_norm=_ptr(attn.q_a_layernorm.weight) if q_lora else None, q_b=_ptr(q_b.weight),
                kv_a=_ptr(attn.kv_a_proj_with_mqa.weight), kv_norm=_ptr(attn.kv_a_layernorm.weight),
                kv_b=_ptr(attn.kv_b_proj.weight), o=_ptr(attn.o_proj.weight))


def ffn_fields(mlp) -> dict | None:
    """The MoE's or dense MLP's shapes and weight pointers, or None where the fused layer cannot take it."""
    if not isinstance(mlp, MoE):
        if not _fp32(mlp.gate_up_proj, mlp.down_proj):
            return None
        return dict(experts=0, gate_up=_ptr(mlp.gate_up_proj), down=_ptr(mlp.down_proj), inter=mlp.inter)
    g, ex, sh = mlp.gate, mlp.experts, mlp.shared_experts
    bias = g.e_score_correction_bias
    if not _fp32(g.weight, ex.gate_up_proj, ex.down_proj, *([] if bias is None else [bias]),
                 *([] if sh is None else [sh.gate_up_proj, sh.down_proj])) or g.top_k > 64:
        return None
    return dict(experts=ex.n, top_k=g.top_k, n_group=g.n_group, topk_group=g.topk_group,
                method=kernels.ROUTE_METHODS[g.method], sigmoid=int(g.scoring == "sigmoid"),
                norm_topk=int(g.norm_topk_prob), route_scale=g.scale, router=_ptr(g.weight), bias=_ptr(bias),
                gate_up=_ptr(ex.gate_up_proj), down=_ptr(ex.down_proj), inter=ex.inter,
                sh_gate_up=_ptr(sh.gate_up_proj) if sh else None, sh_down=_ptr(sh.down_proj) if sh else None,
                sh_inter=sh.inter if sh else 0, counts=_ptr(mlp.expert_counts))


def layer_struct(layer, d: int) -> LayerC | None:
    attn, ffn = attention_fields(layer.self_attn), ffn_fields(layer.mlp)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if attn is None or ffn is None or not _fp32(*norms):
        return None
    return LayerC(d=d, in_norm=_ptr(norms[0]), post_norm=_ptr(norms[1]), **attn, **ffn)


class FusedDecoder:
    """The model's decode step with each layer one C call: embedding, the layers, the final norm."""

    def __init__(self, model, layers: list[LayerC], caches: list[torch.Tensor]):
        self.model, self.layers, self.caches, self.lib = model.model, layers, caches, kernels.library()
        self.cache_format = CACHE_FORMATS[str(caches[0].dtype).removeprefix("torch.")]

    @classmethod
    def build(cls, model, caches: list[torch.Tensor]) -> "FusedDecoder | None":
        """The decoder for a loaded model whose KernelConfig asks for it, writing into `caches` (one per layer),
        or None if it does not ask or if any layer or cache cannot take the fused path."""
        if not model.kernel_config.fused_decode or kernels.library() is None or not _cpu_caches(caches):
            return None
        layers = [layer_struct(layer, model.config.hidden_size) for layer in model.model.layers]
        return None if any(s is None for s in layers) else cls(model, layers, caches)

    @staticmethod
    def takes(num_tokens: int, meta: AttentionMetadata) -> bool:
        """Whether a step fits: decodes only, at most kernels.MAX_M tokens."""
        return meta.num_prefills == 0 and 0 < num_tokens <= kernels.MAX_M

    def __call__(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        x, caches = self.model.embed(input_ids), self.caches
        cs, lens = torch.view_as_real(self.model.rotary.rotation(positions)), positions + 1
        index = [t.contiguous() for t in (meta.slot_mapping, meta.gather_index, meta.token_seq)]
        step = StepC(x.shape[0], index[1].shape[0], index[1].shape[1], caches[0].shape[0], self.cache_format,
                     cs.data_ptr(), *(t.data_ptr() for t in index), lens.data_ptr())
        threads = torch.get_num_threads()
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            code = run_layer(self.lib, layer, step, x.data_ptr(), cache.data_ptr(), threads)
            if code:
                raise RuntimeError(f"fused decode layer {i} failed with code {code} (see kernels/decode_layer.c)")
        return self.model.norm(x)
