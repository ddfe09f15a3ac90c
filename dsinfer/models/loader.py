"""Reads a Hugging Face checkpoint directory: config.json and safetensors, one tensor at a time."""
import json
import os
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsinfer.config import ModelConfig
from dsinfer.quant.fp8 import FP8_DTYPES, check_fp8_config, dequantize_fp8


class CheckpointError(ValueError):
    """The checkpoint directory or one of its files is not what a DeepSeek checkpoint must be."""


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
            check_fp8_config(cfg.quantization_config)
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}") from None
    return cfg


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
    for n, b in module.named_buffers(recurse=False):
        if n not in module._non_persistent_buffers_set:
            views[prefix + n] = b
    for n, child in module.named_children():
        views.update(checkpoint_views(child, f"{prefix}{n}."))
    return views


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Fills every parameter of `model` from the checkpoint. Returns the MTP layer's tensors (name -> file),
    which are recognised and kept aside, not loaded."""
    path, cfg = Path(path), model.config
    views = checkpoint_views(model)
    block = check_fp8_config(cfg.quantization_config) if cfg.quantization_config else None
    where = {name: file for file, names in tensor_files(path).items() for name in names}
    size = sum((path / f).stat().st_size for f in set(where.values()))
    mtp, loaded = {}, set()
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(path / f, "pt")) for f in sorted(set(where.values()))}
        for name in tqdm(where, desc="loading weights", unit="tensor", disable=size < 1 << 30):
            m = _LAYER.match(name)
            if m and int(m.group(1)) >= cfg.num_hidden_layers:
                mtp[name] = where[name]
            elif name in views:
                _copy(views[name], _read(handles, where, name, block), name)
                loaded.add(name)
    missing = [n for n in views if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {shown}")
    return mtp


def _get(handles, where, name: str) -> torch.Tensor:
    try:
        return handles[where[name]].get_tensor(name)
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


def _copy(dest: torch.Tensor, src: torch.Tensor, name: str):
    if tuple(src.shape) != tuple(dest.shape):
        raise CheckpointError(f"tensor {name} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(src)
