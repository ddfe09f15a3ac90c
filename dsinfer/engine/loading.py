"""The model an engine runs, read from its EngineConfig: the same steps for a single process and for each rank
of a tensor-parallel group (which passes its Shard)."""
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dsinfer.engine.config import EngineConfig
from dsinfer.models import load_model
from dsinfer.models.loader import default_model_path, read_config

log = logging.getLogger("dsinfer")


@dataclass(slots=True)
class Loaded:
    path: Path
    model: torch.nn.Module
    bits: dict | None   # bits per quantized unit, or None
    mtp: dict           # MTP tensors the model does not use
    dtype: torch.dtype
    device: torch.device


def load_engine_model(cfg: EngineConfig, shard=None) -> Loaded:
    """Reads the checkpoint cfg.model names, fits cfg to it, and builds and loads its model (this rank's part
    of it with a shard) with the kernels cfg chooses."""
    path = Path(cfg.model) if cfg.model is not None else default_model_path()
    mcfg = read_config(path)
    cfg.fit_to(mcfg)
    device = cfg.torch_device()
    dtype = cfg.torch_dtype(device)
    log.info("dtype: %s%s", str(dtype).removeprefix("torch."), " (auto)" if cfg.dtype == "auto" else "")
    torch.manual_seed(cfg.seed)
    model, bits, mtp = load_model(path, mcfg, dtype, device, cfg.mla_mode, cfg.kernel_config(device),
                                  cfg.quantization, cfg.quant_group_size, cfg.map_embeddings, shard)
    return Loaded(path, model, bits, mtp, dtype, device)
