"""dsinfer: an inference engine for DeepSeek-architecture language models."""
from pathlib import Path

from dsinfer.llm import LLM
from dsinfer.outputs import CompletionOutput, Logprob, RequestOutput
from dsinfer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "DEFAULT_MODEL",
           "default_model_path"]
__version__ = "0.1.0"
DEFAULT_MODEL = Path(__file__).parent / "default_model"  # the built-in model, shipped as package data


def default_model_path() -> Path:
    """DEFAULT_MODEL, checked: an install without its files gets a clear error instead of a missing-file one."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ValueError(f"no model given, and the built-in default model is missing from {DEFAULT_MODEL}; "
                         "pass a checkpoint path or reinstall dsinfer")
    return DEFAULT_MODEL
