import torch

from dsinfer.config import ModelConfig
from dsinfer.models.deepseek import DeepseekForCausalLM

MODEL_CLASSES = {"deepseek_v2": DeepseekForCausalLM, "deepseek_v3": DeepseekForCausalLM}


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, mla_mode: str = "auto"):
    """Allocates the model on `device` in `dtype` without initialising weights (the loader fills them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return MODEL_CLASSES[cfg.model_type](cfg, mla_mode).eval()
    finally:
        torch.set_default_dtype(previous)
