"""The model an engine runs, read from its EngineConfig: the same steps for a single process and for each rank
of a tensor-parallel group (which passes its Shard)."""
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dsinfer.engine.config import EngineConfig
from dsinfer.models import load_model
from dsinfer.models.loader import default_model_path, read_config
from dsinfer.models.mtp import load_mtp

log = logging.getLogger("dsinfer")


@dataclass(slots=True)
class Loaded:
    path: Path
    model: torch.nn.Module
    bits: dict | None   # bits per quantized unit, or None
    mtp: dict           # the MTP layer's tensors (name -> file)
    dtype: torch.dtype
    device: torch.device
    draft: torch.nn.Module | None  # the MTP draft layer, when speculative_config asks for it


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
    kc = cfg.kernel_config(device)
    model, bits, mtp = load_model(path, mcfg, dtype, device, cfg.mla_mode, kc, cfg.quantization,
                                  cfg.quant_group_size, cfg.map_embeddings, cfg.sparse_config(), shard)
    draft = load_mtp(model, path, mtp, dtype, device, cfg.mla_mode, kc, cfg.draft_quantization(kc)) \
        if cfg.speculative_config else None
    return Loaded(path, model, bits, mtp, dtype, device, draft)
