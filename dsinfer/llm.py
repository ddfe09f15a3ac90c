"""The offline API, with vLLM's names: LLM(...).generate(prompts, SamplingParams(...))."""
import os
from collections.abc import Iterator

import torch
from tqdm import tqdm

from dsinfer.engine.config import EngineConfig
from dsinfer.engine.input_processor import truncate_prompt
from dsinfer.engine.llm_engine import LLMEngine
from dsinfer.engine.model_runner import embed
from dsinfer.outputs import RequestOutput
from dsinfer.sampling_params import SamplingParams
from dsinfer.tokenizer import Tokenizer


class LLM:
    """LLM(model=None, **options): a checkpoint directory (None: the built-in model) and any EngineConfig
    option by name (dtype, device, max_model_len, quantization, enable_prefix_caching, cpu_kernels, ...)."""

    def __init__(self, model: str | os.PathLike | None = None, **options):
        self.config = EngineConfig.from_kwargs(model=model, **options)
        self.engine = LLMEngine.from_config(self.config)
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        self.device, self.dtype, self.max_model_len = self.engine.device, self.engine.dtype, self.engine.max_model_len
        self.quantization, self.mtp_tensors = self.engine.quantization, self.engine.mtp_tensors
        self.kernel_config, self.kv_cache_dtype = self.model.kernel_config, self.engine.cache.kv_dtype  # as resolved
        self.request_counter = 0

    def close(self):
        """Writes the prefix-cache blocks still in memory to the disk tier (prefix_cache_dir), so that a later
        process finds them; nothing to do without one. Also on leaving a `with LLM(...) as llm:` block."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc):
        self.close()

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
             chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations; tools:
        OpenAI tool definitions, handed to the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt(c, chat_template, add_generation_prompt, tools) for c in convs],
                             sampling_params)

    def chat_prompt(self, conversation: list[dict], chat_template=None, add_generation_prompt=True,
                    tools: list[dict] | None = None) -> dict:
        return self.engine.inputs.chat_prompt(conversation, chat_template, add_generation_prompt, tools)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the request's state after every step that advanced it (for printing text as it is made)."""
        (rid,) = self.add_requests([prompt], sampling_params)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id == rid:
                    yield out

    def embed(self, prompts) -> list[torch.Tensor]:
        """Each prompt's embedding, as /v1/embeddings gives it: the model's final hidden states, mean-pooled and
        L2-normalised (fp32 [hidden_size]). Prompts as for generate."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        ids = [self.engine.inputs.process(p)[1] for p in prompts]
        for one in ids:
            self.engine.check_prompt(one)
        return [embed(self.model, one) for one in ids]

    def step(self) -> list[RequestOutput]:
        """One engine step: the state of every request that produced a token in it (for callers that drive
        requests themselves, as benchmarks do)."""
        return self.engine.step()

    def stats(self):
        """The engine's EngineStats: queues, cache blocks, prefix-cache hits, preemptions, speculative decoding's
        acceptance."""
        return self.engine.stats()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def add_requests(self, prompts, sampling_params) -> list[str]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        parsed = [self.engine.inputs.process(p) for p in prompts]
        parsed = [(text, truncate_prompt(ids, sp)) for (text, ids), sp in zip(parsed, params)]
        for text, ids in parsed:
            self.engine.check_prompt(ids)
        rids = []
        for (text, ids), sp in zip(parsed, params):
            rids.append(str(self.request_counter))
            self.request_counter += 1
            self.engine.add_request(rids[-1], text, ids, sp)
        return rids
