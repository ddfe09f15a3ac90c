"""The ctypes mirror of decode_layer.c's structs, checked against the compiled library when it loads, and the
call that runs a decode batch through one layer. The structs are filled by dsinfer/models/fused_decode.py."""
import ctypes

P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


WEIGHT_FORMATS = {"float32": 0, "bfloat16": 1, 8: 2, 4: 3}  # MatC.format by dtype, or by bits for QTensors


class MatC(ctypes.Structure):
    """A weight matrix: values (fp32, bf16) or int8 / int4 codes with per-group scales (and mins); wide: values
    read once for up to 16 rows of x (KernelConfig.wide_steps)."""
    _fields_ = [(n, P) for n in ("w", "scales", "mins")] + [(n, I64) for n in ("format", "group", "int8_x", "wide")]


class LayerC(ctypes.Structure):
    _fields_ = [(n, I64) for n in ("d", "h", "dn", "dr", "dv", "r", "qr")] + [("eps", F32), ("scale", F32)] + \
        [(n, P) for n in ("in_norm", "post_norm", "q_a_norm", "kv_norm")] + \
        [(n, MatC) for n in ("q_a", "q_b", "kv_a", "kv_b", "o")] + \
        [(n, I64) for n in ("experts", "top_k", "n_group", "topk_group", "method", "sigmoid", "norm_topk")] + \
        [("route_scale", F32), ("router", P), ("router_bf16", I64), ("bias", P), ("gate_up", MatC),
         ("down", MatC), ("inter", I64), ("sh_gate_up", MatC), ("sh_down", MatC), ("sh_inter", I64), ("counts", P),
         ("first_expert", I64), ("local_experts", I64),  # local_experts 0: all of them
         ("token_parallel", I64)]  # threads split a step's tokens (a small layer), not each product's rows


class StepC(ctypes.Structure):
    _fields_ = [(n, I64) for n in ("t", "b", "lmax", "cache_rows", "cache_format")] + \
        [(n, P) for n in ("cs", "slots", "rows", "seq", "lens")]


class DraftC(ctypes.Structure):
    """The MTP draft layer's parts around its decoder layer (decode_draft.c)."""
    _fields_ = [(n, I64) for n in ("d", "vocab", "embed_bf16")] + [("eps", F32)] + \
        [(n, P) for n in ("enorm", "hnorm", "out_norm", "embed")] + [("eh_proj", MatC), ("head", MatC)]


STRUCTS = {0: LayerC, 1: StepC, 2: MatC, 3: DraftC}  # the codes decode_layer_layout knows
CACHE_FORMATS = {"float32": 0, "bfloat16": 1, "uint8": 2}  # StepC.cache_format by the cache tensor's dtype (uint8: fp8)


class LayoutError(RuntimeError):
    pass


def c_layout(lib: ctypes.CDLL, which: int) -> tuple[int, dict[str, int]]:
    """(sizeof, {field: offset}) of the C struct, as compiled."""
    names = lib.decode_layer_names(which).decode().rstrip(",").split(",")
    out = (I64 * (len(names) + 1))()
    n = lib.decode_layer_layout(which, out, len(out))
    if n != len(names) + 1:
        raise LayoutError(f"decode_layer_layout({which}) gave {n} values for {len(names)} fields")
    return out[0], dict(zip(names, out[1:]))


def check_layout(lib: ctypes.CDLL, structs: dict[int, type] = STRUCTS):
    """Raises LayoutError naming the first field whose offset (or the struct whose size or fields) differs
    between the C structs and their ctypes mirrors."""
    for which, mirror in structs.items():
        size, offsets = c_layout(lib, which)
        ours = {name: getattr(mirror, name).offset for name, _ in mirror._fields_}
        if set(ours) != set(offsets):
            raise LayoutError(f"{mirror.__name__} fields {sorted(set(ours) ^ set(offsets))} are in only one of "
                              "the C struct and its ctypes mirror")
        for name, offset in offsets.items():
            if ours[name] != offset:
                raise LayoutError(f"{mirror.__name__}.{name} is at byte {ours[name]} in the ctypes mirror but at "
                                  f"{offset} in the compiled library")
        if ctypes.sizeof(mirror) != size:
            raise LayoutError(f"{mirror.__name__} is {ctypes.sizeof(mirror)} bytes in ctypes, {size} in C")


def run_layer(lib: ctypes.CDLL, layer: LayerC, step: StepC, x_ptr: int, cache_ptr: int, threads: int) -> int:
    """x [T, d] through one decoder layer in place; 0 or the C error code."""
    return lib.decode_layer_f32(ctypes.byref(layer), ctypes.byref(step), x_ptr, cache_ptr, threads)


def run_attention(lib: ctypes.CDLL, layer: LayerC, step: StepC, x_ptr: int, cache_ptr: int, out_ptr: int,
                  threads: int) -> int:
    """out [T, d] = the layer's attention half for x [T, d] (x unchanged; cache rows written); 0 or the C code."""
    return lib.decode_attention_f32(ctypes.byref(layer), ctypes.byref(step), x_ptr, cache_ptr, out_ptr, threads)


def run_ffn(lib: ctypes.CDLL, layer: LayerC, step: StepC, x_ptr: int, out_ptr: int, threads: int) -> int:
    """out [T, d] = the layer's MoE / MLP half for x [T, d] (x unchanged); 0 or the C error code."""
    return lib.decode_ffn_f32(ctypes.byref(layer), ctypes.byref(step), x_ptr, out_ptr, threads)


def run_draft(lib: ctypes.CDLL, draft: DraftC, layer: LayerC, step: StepC, ids_ptr: int, hidden_ptr: int,
              hidden_bf16: bool, keep_ptr: int | None, kept: int, cache_ptr: int, out_ptr: int, logits_ptr: int,
              threads: int) -> int:
    """The draft layer over a decode batch, its output and logits at the kept rows (kept < 0: every row; 0: none,
    the cache rows only); 0 or the C code."""
    return lib.decode_draft_f32(ctypes.byref(draft), ctypes.byref(layer), ctypes.byref(step), ids_ptr, hidden_ptr,
                                int(hidden_bf16), keep_ptr, kept, cache_ptr, out_ptr, logits_ptr, threads)
