"""Reads a Hugging Face checkpoint directory: config.json and safetensors, one tensor at a time."""
import json
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsinfer import malloc
from dsinfer.config import ModelConfig
from dsinfer.layers.embedding import FileRows
from dsinfer.models.sharded_load import ShardError, read_gptq_part, read_part, store_part
from dsinfer.quant import gptq_format
from dsinfer.quant.fp8 import FP8_DTYPES, check_fp8_config, dequantize_fp8
from dsinfer.quant.qtensor import QTensor, expand_groups


DEFAULT_MODEL = Path(__file__).parent.parent / "default_model"  # the built-in model, shipped as package data


class CheckpointError(ValueError):
    """The checkpoint directory or one of its files is not what a DeepSeek checkpoint must be."""


def default_model_path() -> Path:
    """DEFAULT_MODEL, checked: an install without its files gets a clear error instead of a missing-file one."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ValueError(f"no model given, and the built-in default model is missing from {DEFAULT_MODEL}; "
                         "pass a checkpoint path or reinstall dsinfer")
    return DEFAULT_MODEL


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {str(path)!r} is not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    try:
        cfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    if cfg.quantization_config:
        try:
            check_quant_config(cfg.quantization_config)
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}") from None
    return cfg


def check_quant_config(qc: dict):
    if qc.get("quant_method") == "gptq":
        gptq_format.check_gptq_config(qc)
    elif qc.get("quant_method") == "fp8":
        check_fp8_config(qc)
    else:
        raise ValueError(f"unsupported quantization_config.quant_method {qc.get('quant_method')!r}; "
                         "dsinfer loads 'fp8' and 'gptq' checkpoints")


def tensor_files(path: Path) -> dict[str, list[str]]:
    """Safetensors file -> tensor names in it, from model.safetensors.index.json or every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{index.name} names {f}, which is not in {path}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    return {f: _keys(path / f) for f in files}


def tensor_info(path: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, dtype name) from the safetensors headers, without reading any data."""
    path, info = Path(path), {}
    for file, names in tensor_files(path).items():
        with safe_open(path / file, "pt") as f:
            for n in names:
                s = f.get_slice(n)
                info[n] = (s.get_shape(), s.get_dtype())
    return info


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # header name -> torch


def file_rows(path: str | os.PathLike, name: str) -> FileRows:
    """A 2-D tensor of the checkpoint left in its file and read row by row on lookup (the embedding table, of
    which a step reads a few rows). Reads the safetensors header itself to find the tensor's bytes."""
    path = Path(path)
    file = next(f for f, names in tensor_files(path).items() if name in names)
    with open(path / file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(size))[name]
    if meta["dtype"] not in SAFETENSORS_DTYPES or len(meta["shape"]) != 2:
        raise CheckpointError(f"tensor {name} is {meta['dtype']} {meta['shape']}; only 2-D 16- and 32-bit floats "
                              "can be read from the file")
    return FileRows(path / file, 8 + size + meta["data_offsets"][0], meta["shape"], SAFETENSORS_DTYPES[meta["dtype"]])


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{file} is not a readable safetensors file (corrupt or truncated): {e}") from None


def checkpoint_views(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the tensor (or slice of one) it is copied into."""
    if hasattr(module, "checkpoint_views"):
        views = module.checkpoint_views(prefix)
    else:
        views = {prefix + n: p.data for n, p in module.named_parameters(recurse=False)}
        views.update({prefix + n: v for n, v in vars(module).items() if isinstance(v, QTensor)})
    for n, b in module.named_buffers(recurse=False):
        if n not in module._non_persistent_buffers_set:
            views[prefix + n] = b
    for n, child in module.named_children():
        views.update(checkpoint_views(child, f"{prefix}{n}."))
    return views


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Fills every parameter of `model` from the checkpoint. Returns the MTP layer's tensors (name -> file),
    which are recognised and kept aside, not loaded (models/mtp.py loads them when speculation asks for them)."""
    path, cfg = Path(path), model.config
    where = {name: file for file, names in tensor_files(path).items() for name in names}
    mtp = {name: file for name, file in where.items() if _is_mtp(name, cfg.num_hidden_layers)}
    size = sum((path / f).stat().st_size for f in set(where.values()))
    shard, group = getattr(model, "shard", None), getattr(model, "requested_group", None)  # tensor parallel
    fill(checkpoint_views(model), path, {n: f for n, f in where.items() if n not in mtp}, cfg, size < 1 << 30,
         shard, group)
    return mtp


def _is_mtp(name: str, num_layers: int) -> bool:
    m = _LAYER.match(name)
    return bool(m) and int(m.group(1)) >= num_layers


def fill(views: dict, path: Path, where: dict[str, str], cfg: ModelConfig, quiet: bool = True, shard=None,
         group=None):
    """Copies the tensors of `where` (name -> file) into `views` (checkpoint_views); names not in views are
    ignored, and a view left unfilled is a CheckpointError naming it. shard / group: this rank's slices."""
    qc = cfg.quantization_config or {}
    block = check_fp8_config(qc) if qc.get("quant_method") == "fp8" else None
    loaded, handles = set(), ShardReader(path)
    for name in tqdm(where, desc="loading weights", unit="tensor", disable=quiet):
        if name.endswith(".qweight") and name[:-7] + "weight" in views:
            target = name[:-7] + "weight"
            _load_gptq(views[target], handles, where, name[:-8], qc, target, shard)
            loaded.add(target)
        elif name in views and shard is not None:
            _copy_part(views[name], handles, where, name, block, shard, group)
            loaded.add(name)
        elif name in views:
            _copy(views[name], _read(handles, where, name, block), name)
            loaded.add(name)
    _check_ignored_indexer(where, views, cfg.model_type)
    missing = [n for n in views if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {shown}")


def _check_ignored_indexer(where, views, model_type: str):
    """A sparse-attention indexer in a checkpoint whose model type has none would be dropped silently, and
    attention would run dense: wrong past index_topk tokens. That is an error, not a load."""
    ignored = sorted(n for n in where if ".self_attn.indexer." in n and n not in views)
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        raise CheckpointError(f"the checkpoint has sparse-attention indexer tensors ({shown}) that model_type "
                              f"{model_type!r} does not use; a DeepSeek-V3.2 checkpoint must say "
                              f"model_type 'deepseek_v32'")


class ShardReader:
    """Opens safetensors files as tensors are asked for, and re-opens a file after REMAP_BYTES have been read
    from it: the mapped pages a read touches count as resident memory until the file is unmapped, so loading
    never holds more than that much of the checkpoint on top of the model (which matters when quantizing on
    load, where the model is a fraction of the file). The heap is trimmed at the same points (dsinfer/malloc.py)."""
    REMAP_BYTES = 64 << 20

    def __init__(self, path: Path):
        self.path, self.files, self.read = path, {}, {}

    def get(self, file: str, name: str, index=None) -> torch.Tensor:
        """The tensor, or only tensor[index] (a tuple of slices), reading only those bytes."""
        t = self.open(file).get_tensor(name) if index is None else self.open(file).get_slice(name)[index]
        self.read[file] += t.numel() * t.element_size()
        if self.read[file] > self.REMAP_BYTES:
            del self.files[file]
            malloc.trim()  # and the heap left fragmented by the temporaries of the last REMAP_BYTES
        return t

    def open(self, file: str):
        if file not in self.files:
            self.files[file], self.read[file] = safe_open(self.path / file, "pt"), 0
        return self.files[file]

    def shape(self, file: str, name: str) -> list[int]:
        return self.open(file).get_slice(name).get_shape()


def _get(handles: ShardReader, where, name: str) -> torch.Tensor:
    try:
        return handles.get(where[name], name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name} from {where[name]}: {e}") from None


def _read(handles, where, name: str, block) -> torch.Tensor:
    t = _get(handles, where, name)
    if t.dtype not in FP8_DTYPES:
        return t
    scale = name + "_scale_inv"
    if block is None:
        raise CheckpointError(f"tensor {name} is fp8 but config.json has no fp8 quantization_config")
    if scale not in where:
        raise CheckpointError(f"fp8 tensor {name} has no {scale} beside it")
    try:
        return dequantize_fp8(t, _get(handles, where, scale), block, name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _copy_part(dest, handles, where, name: str, block, shard, group):
    """This rank's part of tensor `name` into dest (sharded_load.py)."""
    scale = name + "_scale_inv"

    def scale_inv():
        if block is None:
            raise CheckpointError(f"tensor {name} is fp8 but config.json has no fp8 quantization_config")
        if scale not in where:
            raise CheckpointError(f"fp8 tensor {name} has no {scale} beside it")
        return _get(handles, where, scale)

    try:
        t = read_part(handles, where[name], name, dest, shard, scale_inv, block, group)
    except ShardError as e:
        raise CheckpointError(str(e)) from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name} from {where[name]}: {e}") from None
    if isinstance(dest, QTensor):
        store_part(dest, t, shard)
    else:
        _copy(dest, t, name)


def _copy(dest: torch.Tensor | QTensor, src: torch.Tensor, name: str):
    if tuple(src.shape) != tuple(dest.shape):
        raise CheckpointError(f"tensor {name} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}")
    if isinstance(dest, QTensor):
        dest.store(src)  # quantize on load, one tensor at a time
    else:
        dest.copy_(src)


def _gptq_tensors(handles, where, base: str) -> dict[str, torch.Tensor]:
    out = {}
    for suffix in gptq_format.SUFFIXES:
        name = f"{base}.{suffix}"
        if name in where:
            out[suffix] = _get(handles, where, name)
        elif suffix != "g_idx":
            raise CheckpointError(f"GPTQ tensor {base}.qweight has no {name} beside it")
    return out


def _gptq_reader(handles, where, base: str):
    """(read(suffix, index=None), shape(suffix) or None if absent) of GPTQ layer `base`'s tensors."""
    for suffix in gptq_format.SUFFIXES[:3]:
        if f"{base}.{suffix}" not in where:
            raise CheckpointError(f"GPTQ tensor {base}.qweight has no {base}.{suffix} beside it")

    def read(suffix: str, index=None) -> torch.Tensor:
        name = f"{base}.{suffix}"
        try:
            return handles.get(where[name], name, index)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {where[name]}: {e}") from None

    def shape(suffix: str) -> list[int] | None:
        name = f"{base}.{suffix}"
        return handles.shape(where[name], name) if name in where else None
    return read, shape


def _load_gptq(dest: torch.Tensor | QTensor, handles, where, base: str, qc: dict, name: str, shard=None):
    """Repacks GPTQ layer `base` into a QTensor (exactly), or dequantizes it for a full-precision destination;
    with a shard, this rank's part of it, reading only its slices."""
    n, k = dest.shape[-2:]
    try:
        if shard is None:
            t = _gptq_tensors(handles, where, base)
            bits, group, codes, scales, mins, perm = gptq_format.read_layer(t, qc, n, k, name[:-7])
        else:
            read, shape = _gptq_reader(handles, where, base)
            bits, group, codes, scales, mins, perm = read_gptq_part(read, shape, qc, n, k, shard, name[:-7])
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(dest, QTensor):
        w = codes.float() * expand_groups(scales, k, group) + (0 if mins is None else expand_groups(mins, k, group))
        dest.copy_(w if perm is None else torch.empty_like(w).index_copy_(1, perm, w))
        return
    if dest.bits != bits or dest.group_size != group:
        raise CheckpointError(f"{name[:-7]} is {bits}-bit in groups of {group}, but its sibling tensors are "
                              f"{dest.bits}-bit in groups of {dest.group_size}")
    if dest.perm is not None:
        perm = _check_perm(dest.perm, torch.arange(k) if perm is None else perm, name)
    elif perm is not None:
        raise CheckpointError(f"{name[:-7]}.g_idx is in activation order but the config does not say desc_act")
    if mins is not None and dest.mins is None:
        raise CheckpointError(f"{name[:-7]} has asymmetric zero points but the config says sym")
    dest.store_codes(codes, scales, mins if dest.mins is not None else None, perm)


def _check_perm(current: torch.Tensor, perm: torch.Tensor, name: str) -> torch.Tensor:
    """gate_proj and up_proj share one fused matrix and so one column order."""
    if not torch.equal(current, torch.arange(len(current))) and not torch.equal(current, perm):
        raise CheckpointError(f"{name[:-7]}.g_idx orders the input differently from the tensor fused with it")
    return perm
