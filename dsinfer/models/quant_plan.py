"""Which weights are quantized, and swapping them for empty QTensors before the loader fills them.

A unit is one weight matrix of the model as dsinfer stores it: a linear layer's weight, an MLP's fused
gate/up or its down matrix, or one layer's stack of routed-expert matrices. Every unit is quantized except
kv_b_proj (MLA's absorbed decode reads it per head; 2 M values a layer in V2-Lite), the routers, the norms
and the embeddings, which stay in full precision."""
from dataclasses import dataclass

import torch
from torch import nn

from dsinfer.layers.linear import Linear
from dsinfer.layers.mlp import MLP
from dsinfer.layers.moe import Experts
from dsinfer.models.loader import SAFETENSORS_DTYPES, CheckpointError, checkpoint_views, file_rows, tensor_info
from dsinfer.quant.gptq_format import bits_of
from dsinfer.quant.qtensor import QTensor

KEEP = ("kv_b_proj",)
DEFAULT_GROUP = {8: -1, 4: 128}  # -1: one group per row (per-channel)


@dataclass(slots=True)
class Unit:
    name: str              # e.g. model.layers.1.mlp.experts.gate_up_proj
    module: nn.Module
    attr: str
    checkpoint_names: list[str]

    @property
    def weight(self):
        return getattr(self.module, self.attr)

    @property
    def numel(self) -> int:
        shape = self.weight.shape
        return int(torch.Size(shape).numel())


def units(model: nn.Module) -> list[Unit]:
    """Every quantizable weight of the model, in module order."""
    found = []
    for path, module in model.named_modules():
        if any(path.endswith(k) for k in KEEP):
            continue
        attrs = ["weight"] if isinstance(module, Linear) else ["gate_up_proj", "down_proj"] \
            if isinstance(module, (MLP, Experts)) else []
        for attr in attrs:
            found.append(Unit(f"{path}.{attr}", module, attr, _checkpoint_names(module, path, attr)))
    return found


def _checkpoint_names(module: nn.Module, path: str, attr: str) -> list[str]:
    target = getattr(module, attr)
    views = checkpoint_views(module, f"{path}.")
    return [n for n, v in views.items() if _shares(v, target)]


def _shares(view, target) -> bool:
    if isinstance(target, QTensor):
        return isinstance(view, QTensor) and view.q.untyped_storage().data_ptr() == target.q.untyped_storage().data_ptr()
    return isinstance(view, torch.Tensor) and view.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()


def group_size_for(bits: int, group_size: int | None, k: int) -> int:
    g = DEFAULT_GROUP[bits] if group_size is None else group_size
    return k if g in (-1, 0) or g > k else g


def quantize_unit(unit: Unit, bits: int, group_size: int | None, with_mins: bool = False, with_perm: bool = False):
    """Replaces the unit's full-precision parameter by an empty QTensor of the same logical shape."""
    shape = tuple(unit.weight.shape)
    device = unit.weight.device
    qt = QTensor.empty(shape, bits, group_size_for(bits, group_size, shape[-1]), device, with_mins)
    if with_perm:
        qt.perm = torch.arange(shape[-1], device=device).expand(*shape[:-2], shape[-1]).contiguous()
    if isinstance(getattr(unit.module, unit.attr), nn.Parameter):
        delattr(unit.module, unit.attr)  # a module's parameter cannot be replaced by a plain object
    setattr(unit.module, unit.attr, qt)


def keep_embedding(model: nn.Module, path, dtype: torch.dtype, mapped: bool):
    """Embeddings stay as they are in the checkpoint (bf16 or fp16: exact), not widened to fp32. `mapped`:
    the table stays in the checkpoint file and a lookup reads its rows from there (FileRows), so none of it
    is resident in the process; else it is copied in at load. A tied table is the LM head too: copied in."""
    inner = model.model
    if mapped and model.lm_head is not None:
        delattr(inner, "embed_tokens")
        inner.embed_tokens = file_rows(path, "model.embed_tokens.weight")
        inner.embed_mapped = True
    elif inner.embed_tokens.dtype != dtype:
        inner.embed_tokens = nn.Parameter(torch.empty_like(inner.embed_tokens, dtype=dtype), requires_grad=False)


def weight_tensors(model: nn.Module):
    """Every tensor that holds weights: parameters, buffers, and the codes and scales of quantized matrices."""
    yield from model.parameters()
    yield from model.buffers()
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, QTensor):
                yield from (t for t in (value.q, value.scales, value.mins) if t is not None)


def summary(model: nn.Module) -> dict[str, int]:
    """Unit name -> bits (16 for a unit left in full precision), as written into a checkpoint's config."""
    return {u.name: u.weight.bits if isinstance(u.weight, QTensor) else 16 for u in units(model)}


MODES = ("int8", "int4", "gptq")


def prepare(model: nn.Module, path, quantization: str | None, group_size: int | None = None,
            map_embeddings: bool = True) -> dict[str, int] | None:
    """Swaps weights for empty QTensors, as a GPTQ checkpoint's tensors or `quantization` (quantize on load)
    say, before the loader fills them. Returns bits per unit, or None for a full-precision model."""
    qc = model.config.quantization_config or {}
    if quantization is not None and quantization not in MODES:
        raise ValueError(f"quantization must be one of {MODES} or None, got {quantization!r}")
    if qc.get("quant_method") == "gptq":
        if quantization not in (None, "gptq"):
            raise ValueError(f"{path} is a GPTQ checkpoint already; load it with quantization=None or 'gptq'")
        info = tensor_info(path)
        for u in units(model):
            _prepare_gptq_unit(u, qc, info)
    elif quantization == "gptq":
        raise ValueError(f"quantization='gptq' needs a GPTQ checkpoint; {path} has no GPTQ quantization_config")
    elif quantization is None:
        return None
    else:
        info, bits = tensor_info(path), 8 if quantization == "int8" else 4
        for u in units(model):
            quantize_unit(u, bits, group_size)
        model.requested_group = DEFAULT_GROUP[bits] if group_size is None else group_size  # for split weights
    shape_dtype = info.get("model.embed_tokens.weight")
    dtype = SAFETENSORS_DTYPES.get(shape_dtype[1]) if shape_dtype else None
    if dtype in (torch.bfloat16, torch.float16) and model.model.embed_tokens.device.type == "cpu":
        keep_embedding(model, path, dtype, map_embeddings)
    return summary(model)


def _input_size(info: dict, qweight: str, k: int) -> int:
    """The layer's full input size: g_idx's length where there is one (a rank of a tensor-parallel model may hold
    only part of the input), else the model's."""
    g_idx = info.get(qweight[:-7] + "g_idx")
    return g_idx[0][0] if g_idx else k


def _prepare_gptq_unit(unit: Unit, qc: dict, info: dict):
    qnames = [n[:-6] + "qweight" for n in unit.checkpoint_names]
    present = [n for n in qnames if n in info]
    if not present:
        return
    if len(present) != len(qnames):
        missing = next(n for n in qnames if n not in info)
        raise CheckpointError(f"{unit.name} is GPTQ-quantized in part: {missing} is missing")
    bits = {bits_of(info[n][0], _input_size(info, n, unit.weight.shape[-1])) for n in present}
    if len(bits) != 1 or not bits <= {4, 8}:
        raise CheckpointError(f"{present[0]} and the tensors fused with it must share 4 or 8 bits; found {sorted(bits)}")
    quantize_unit(unit, bits.pop(), qc.get("group_size", -1), with_mins=not qc.get("sym", True),
                  with_perm=bool(qc.get("desc_act")))
