"""A decode batch through each decoder layer in one C call (kernels/decode_layer.c) instead of the Python layers.

A decode step of a small model is dispatch, not arithmetic: each layer is some forty torch ops and kernel calls
of a few microseconds each. The plan holds every layer's weight pointers and shapes (taken once; weights do
not move after loading), and a step passes only its own inputs. It takes batches of decodes only (no prefill
chunk), at most kernels.MAX_M tokens, with fp32 weights, caches and activations on CPU, and layers without
projection biases; everything else, and everything with the switch off, runs the Python layers, which are
also what the tests compare it with. Switch: DSINFER_FUSED_DECODE=0 or set_enabled(False), or cpu_kernels off."""
import ctypes
import os

import torch

from dsinfer import kernels
from dsinfer.kernels.decode import ROUTE_METHODS
from dsinfer.layers.moe import MoE

_state = {"enabled": os.environ.get("DSINFER_FUSED_DECODE", "1") != "0"}
P = ctypes.c_void_p
I64, F32 = ctypes.c_int64, ctypes.c_float


def set_enabled(on: bool):
    _state["enabled"] = bool(on)


class LayerC(ctypes.Structure):
    _fields_ = [(n, I64) for n in ("d", "h", "dn", "dr", "dv", "r", "qr")] + [("eps", F32), ("scale", F32)] + \
        [(n, P) for n in ("in_norm", "post_norm", "q_a", "q_a_norm", "q_b", "kv_a", "kv_norm", "kv_b", "o")] + \
        [(n, I64) for n in ("experts", "top_k", "n_group", "topk_group", "method", "sigmoid", "norm_topk")] + \
        [("route_scale", F32)] + [(n, P) for n in ("router", "bias", "gate_up", "down")] + [("inter", I64)] + \
        [("sh_gate_up", P), ("sh_down", P), ("sh_inter", I64), ("counts", P)]


class StepC(ctypes.Structure):
    _fields_ = [(n, I64) for n in ("t", "b", "lmax", "cache_rows")] + [(n, P) for n in ("cs", "slots", "rows", "seq", "lens")]


def _fp32(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
               and t.is_contiguous() for t in tensors)


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
    return dict(experts=ex.n, top_k=g.top_k, n_group=g.n_group, topk_group=g.topk_group, method=ROUTE_METHODS[g.method],
                sigmoid=int(g.scoring == "sigmoid"), norm_topk=int(g.norm_topk_prob), route_scale=g.scale,
                router=_ptr(g.weight), bias=_ptr(bias), gate_up=_ptr(ex.gate_up_proj), down=_ptr(ex.down_proj),
                inter=ex.inter, sh_gate_up=_ptr(sh.gate_up_proj) if sh else None,
                sh_down=_ptr(sh.down_proj) if sh else None, sh_inter=sh.inter if sh else 0,
                counts=_ptr(mlp.expert_counts))


def layer_struct(layer, d: int) -> LayerC | None:
    attn, ffn = attention_fields(layer.self_attn), ffn_fields(layer.mlp)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if attn is None or ffn is None or not _fp32(*norms) or layer.mlp.__class__.__name__ not in ("MoE", "MLP"):
        return None
    return LayerC(d=d, in_norm=_ptr(norms[0]), post_norm=_ptr(norms[1]), **attn, **ffn)


def build(model) -> list[LayerC] | None:
    """One struct per decoder layer, or None if any layer cannot take the fused path."""
    if kernels.library() is None:
        return None
    layers = [layer_struct(layer, model.config.hidden_size) for layer in model.layers]
    return None if any(s is None for s in layers) else layers


def usable(x: torch.Tensor, meta, caches) -> bool:
    return (_state["enabled"] and kernels._state["enabled"] and meta.num_prefills == 0
            and 0 < x.shape[0] <= kernels.MAX_M and _fp32(x, *caches))


def run(plan: list[LayerC], x: torch.Tensor, positions: torch.Tensor, cis: torch.Tensor, meta, caches):
    """x [T, d] fp32 (the embeddings) through every layer, in place."""
    cs, lens = torch.view_as_real(cis), positions + 1
    index = [t.contiguous() for t in (meta.slot_mapping, meta.gather_index, meta.token_seq)]
    step = StepC(x.shape[0], index[1].shape[0], index[1].shape[1], caches[0].shape[0], cs.data_ptr(),
                 *(t.data_ptr() for t in index), lens.data_ptr())
    fn, threads = kernels.library().decode_layer_f32, torch.get_num_threads()
    for i, (layer, cache) in enumerate(zip(plan, caches)):
        code = fn(ctypes.byref(layer), ctypes.byref(step), x.data_ptr(), cache.data_ptr(), threads)
        if code:
            raise RuntimeError(f"fused decode layer {i} failed with code {code} (see kernels/decode_layer.c)")
