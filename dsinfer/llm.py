"""The offline API, with vLLM's names: LLM(...).generate(prompts, SamplingParams(...))."""
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dsinfer import kernels, malloc
from dsinfer.engine.config import EngineConfig
from dsinfer.engine.llm_engine import LLMEngine
from dsinfer.layers import mlp
from dsinfer.layers.attention import MLA_MODES
from dsinfer.models import build_model, decode_plan
from dsinfer.models.loader import load_weights, read_config
from dsinfer.outputs import RequestOutput
from dsinfer.quant import plan as quant_plan
from dsinfer.sampling_params import SamplingParams
from dsinfer.tokenizer import Tokenizer

log = logging.getLogger("dsinfer")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU (no fast 16-bit matmul on most CPUs), bf16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str = "auto", device: str = "auto",
                 seed: int = 0, max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, kv_cache_memory: int | None = None,
                 kv_cache_memory_fraction: float = 0.2, block_size: int = 16, length_bucketing: bool = True,
                 mla_mode: str = "auto", cpu_kernels: bool = True, tokenizer: str | None = None,
                 quantization: str | None = None, quant_group_size: int | None = None, map_embeddings: bool = True,
                 ffn_chunk_tokens: int | None = 256, enforce_eager: bool | None = None):
        if model is None:
            from dsinfer import default_model_path
            model = default_model_path()
        if mla_mode not in MLA_MODES:
            raise ValueError(f"mla_mode must be one of {MLA_MODES}, got {mla_mode!r}")
        torch.manual_seed(seed)
        kernels.set_enabled(cpu_kernels)  # process-wide: the weight-streaming CPU matmul for decode batches
        mlp.set_chunk_tokens(ffn_chunk_tokens)
        if enforce_eager is not None:  # process-wide: whole layers in one C call for decode batches; None: as set
            decode_plan.set_enabled(not enforce_eager)
        cfg = read_config(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = build_model(cfg, self.dtype, self.device, mla_mode)
        # bits per quantized unit (None: full precision); weights become empty QTensors for the loader to fill
        self.quantization = quant_plan.prepare(self.model, model, quantization, quant_group_size, map_embeddings)
        malloc.advise_hugepages(quant_plan.weight_tensors(self.model))  # before the loader first writes them
        self.mtp_tensors = load_weights(self.model, model)
        malloc.trim()  # loading's temporaries leave the heap fragmented (dsinfer/malloc.py)
        self.tokenizer = self._load_tokenizer(Path(tokenizer or model))
        limit = cfg.max_position_embeddings
        if max_model_len is not None and not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in 2..{limit} (the model's max_position_embeddings), got {max_model_len}")
        self.max_model_len = max_model_len or limit
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048 if enable_chunked_prefill else max(2048, self.max_model_len)
        self.engine_config = EngineConfig(self.max_model_len, max_num_seqs, max_num_batched_tokens, block_size,
                                          enable_prefix_caching, enable_chunked_prefill, kv_cache_memory,
                                          kv_cache_memory_fraction, length_bucketing)
        self.engine = LLMEngine(self.model, self.tokenizer, self.engine_config, self.dtype, self.device, seed)
        self.request_counter = 0

    @staticmethod
    def _load_tokenizer(path: Path) -> Tokenizer | None:
        if not (path / "tokenizer.json").is_file():
            log.warning("no tokenizer.json in %s: give prompts as {'prompt_token_ids': [...]}; output text will be empty", path)
            return None
        return Tokenizer(path)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        ids = self.add_requests(prompts, sampling_params)
        finished = {}
        with tqdm(total=len(ids), desc="requests", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update()
        return [finished[i] for i in ids]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt(c, chat_template, add_generation_prompt) for c in convs],
                             sampling_params)

    def chat_prompt(self, conversation: list[dict], chat_template=None, add_generation_prompt=True) -> dict:
        tok = self._need_tokenizer("chat")
        text = tok.apply_chat_template(conversation, add_generation_prompt, chat_template)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_bos=False)}

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the request's state after every step that advanced it (for printing text as it is made)."""
        (rid,) = self.add_requests([prompt], sampling_params)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id == rid:
                    yield out

    def step(self) -> list[RequestOutput]:
        """One engine step: the state of every request that produced a token in it (for callers that drive
        requests themselves, as benchmarks do)."""
        return self.engine.step()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def add_requests(self, prompts, sampling_params) -> list[str]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        parsed = [self._parse_prompt(p) for p in prompts]
        for text, ids in parsed:
            self.engine.check_prompt(ids)
        rids = []
        for (text, ids), sp in zip(parsed, params):
            rids.append(str(self.request_counter))
            self.request_counter += 1
            self.engine.add_request(rids[-1], text, ids, sp)
        return rids

    def _parse_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._need_tokenizer("text prompts").encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._parse_prompt(prompt["prompt"])
        raise ValueError(f"a prompt must be a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, got {prompt!r:.80}")

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer, and this model directory has no tokenizer.json; "
                             "give prompts as {'prompt_token_ids': [...]}")
        return self.tokenizer
