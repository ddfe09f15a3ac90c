"""dsinfer: an inference engine for DeepSeek-architecture language models."""
from dsinfer.llm import LLM
from dsinfer.models.loader import DEFAULT_MODEL, default_model_path
from dsinfer.outputs import CompletionOutput, Logprob, RequestOutput
from dsinfer.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "DEFAULT_MODEL",
           "default_model_path"]
__version__ = "0.1.0"
