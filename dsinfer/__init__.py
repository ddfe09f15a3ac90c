"""dsinfer: an inference engine for DeepSeek-architecture language models."""
from pathlib import Path

from dsinfer.llm import LLM
from dsinfer.outputs import CompletionOutput, Logprob, RequestOutput
from dsinfer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "default_model_path"]
__version__ = "0.1.0"


def default_model_path() -> Path:
    """The built-in default model's directory (shipped as package data once it is trained)."""
    path = Path(__file__).parent / "default_model"
    if not (path / "config.json").is_file():
        raise ValueError("no model given, and this install has no built-in default model yet; pass a checkpoint path")
    return path
