"""EngineConfig: every option of an engine by name (vLLM's engine arguments where it has them), filled from
keyword arguments and checked in one place."""
import json
import os
from dataclasses import dataclass, fields

import torch

from dsinfer.config import ModelConfig
from dsinfer.engine.reasoning_end import PARSERS
from dsinfer import kernels
from dsinfer.kernels import KernelConfig
from dsinfer.layers.attention import MLA_MODES
from dsinfer.layers.block_sparse import SparseConfig
from dsinfer.layers.kv_format import KV_CACHE_DTYPES
from dsinfer.models.mtp import DRAFT_BITS
from dsinfer.models.quant_plan import MODES as QUANTIZATIONS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """auto: CUDA if torch sees a device, else CPU; a CUDA device torch cannot see is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device")
    return torch.device(device)


@dataclass(slots=True)
class EngineConfig:
    model: str | os.PathLike | None = None  # checkpoint directory; None: the built-in model
    tokenizer: str | os.PathLike | None = None  # directory with tokenizer.json; None: the model's
    dtype: str | torch.dtype = "auto"       # auto: bf16 on CUDA and on CPUs with AMX / AVX512-BF16, else fp32
    device: str = "auto"                    # auto: CUDA if torch sees it, else CPU
    seed: int = 0
    max_model_len: int | None = None        # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens per step, prefill chunks and decodes together
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_memory: int | None = None      # bytes for the latent cache; None: a fraction of free memory
    kv_cache_memory_fraction: float = 0.2
    kv_cache_dtype: str = "auto"            # auto (the model's dtype), float32, bfloat16, fp8 (DeepSeek's layout)
    prefix_cache_dir: str | os.PathLike | None = None  # a disk tier for evicted prefix-cache blocks
    prefix_cache_dir_bytes: int | None = None  # its size limit; None: 10 GiB
    length_bucketing: bool = True           # admit waiting requests of similar length together
    bucket_window: int = 64                 # how far past the head of the queue bucketing looks
    mla_mode: str = "auto"                  # auto: prefill decompressed, decode absorbed
    quantization: str | None = None         # int8 / int4: quantize weights on load
    quant_group_size: int | None = None
    map_embeddings: bool = True             # quantized models read embedding rows from the checkpoint file
    cpu_kernels: bool | None = None         # dsinfer's C kernels; None: DSINFER_CPU_KERNELS, else on
    enforce_eager: bool | None = None       # True: no fused decode; None: DSINFER_FUSED_DECODE, else fused
    ffn_chunk_tokens: int | None = 256      # tokens per MLP pass on the torch path; None or 0: all at once
    speculative_config: dict | str | None = None  # {"method": "mtp", "num_speculative_tokens": k} or its JSON
    spec_greedy_fast_path: bool = True      # speculative steps of plain greedy decodes only: one argmax verifies all
    spec_draft_quantization: str | None = "auto"  # int8 / int4: the MTP layer and a copy of the head, for drafting
                                                # only; auto: int8 where the fused C kernels draft, else None
    spec_draft_last_rows: bool = True       # the MTP layer's MoE / MLP only at the position each sequence drafts from
    spec_share_steps: bool = True           # the MTP layer reuses the greedy step's fused-layer inputs
    spec_chunk_drafts: bool = True          # MTP catch-ups of more than 8 decode tokens fused, 16 at a time
    spec_draft_one_call: bool = True        # a decode-sized MTP draft step (layer, head, argmax) in one C call
    sparse_attention: dict | None = None    # training-free sparse attention {sink, window, topk_blocks}; None: dense
    tensor_parallel_size: int = 1           # ranks the model is split over (worker processes, or torchrun's)
    enable_expert_parallel: bool = False    # routed experts split by expert, not by intermediate
    bind_cores: bool = True                 # each rank on this machine bound to its own share of the cores
    pack_step_messages: bool = True         # a step to the other ranks as one int64 broadcast, its logits rows too
    grammar_check_first: bool = True        # structured outputs: a grammar's mask only when the sample breaks it
    grammar_share_lexer: bool = True        # structured outputs: a grammar's matchers share the lexer states built
    grammar_lean_refusal: bool = True       # structured outputs: a refused token's mask and best token, one lean C call
    reasoning_parser: str | None = None     # deepseek_r1: structured outputs start after </think>

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """The config with these options by name; an unknown name is a TypeError that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**kwargs)
        cfg.check()
        return cfg

    def check(self):
        """Checks what can be checked before the model's config is read."""
        positive = ("max_num_seqs", "block_size", "bucket_window", "tensor_parallel_size")
        for name in positive + ("max_num_batched_tokens", "max_model_len", "prefix_cache_dir_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.mla_mode not in MLA_MODES:
            raise ValueError(f"mla_mode must be one of {MLA_MODES}, got {self.mla_mode!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.ffn_chunk_tokens is not None and self.ffn_chunk_tokens < 0:
            raise ValueError(f"ffn_chunk_tokens must be >= 0 or None, got {self.ffn_chunk_tokens}")
        self.torch_dtype(torch.device("cpu"))
        if self.reasoning_parser is not None and self.reasoning_parser not in PARSERS:
            raise ValueError(f"reasoning_parser must be one of {PARSERS} or None, got {self.reasoning_parser!r}")
        self.speculative_config = check_speculative_config(self.speculative_config)
        if self.spec_draft_quantization not in (None, "auto", *DRAFT_BITS):
            raise ValueError(f"spec_draft_quantization must be one of {('auto', *DRAFT_BITS)} or None, "
                             f"got {self.spec_draft_quantization!r}")
        sparse = self.sparse_config()
        if sparse is not None and sparse.window < self.block_size:
            raise ValueError(f"sparse_attention.window ({sparse.window}) must be at least block_size "
                             f"({self.block_size}): then every block a query chooses among is full and in its past")
        if self.tensor_parallel_size > 1 and (self.speculative_config or sparse is not None):
            raise ValueError("tensor_parallel_size > 1 does not support speculative_config or sparse_attention yet")

    def draft_quantization(self, kc) -> str | None:
        """spec_draft_quantization resolved for the model's KernelConfig: auto is int8 where the fused C decode
        kernels run the draft (their int8 kernels read a quarter of fp32's bytes, half of bf16's), else None."""
        if self.spec_draft_quantization != "auto":
            return self.spec_draft_quantization
        return "int8" if kc.fused_decode else None

    def sparse_config(self) -> SparseConfig | None:
        """The checked sparse_attention setting (layers/block_sparse.py), None when off."""
        return None if self.sparse_attention is None else SparseConfig.from_dict(self.sparse_attention)

    def fit_to(self, model: ModelConfig):
        """Fills what depends on the model (max_model_len, the step's token budget) and checks the rest."""
        limit = model.max_position_embeddings
        if self.max_model_len is not None and not 1 < self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in 2..{limit} (the model's max_position_embeddings), "
                             f"got {self.max_model_len}")
        self.max_model_len = self.max_model_len or limit
        if self.sparse_attention is not None and model.has_indexer:
            raise ValueError(f"sparse_attention is for models without an indexer; {model.model_type} attends "
                             f"through its own indexer (index_topk {model.index_topk})")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 2048 if self.enable_chunked_prefill else max(2048, self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                             f"be at least max_model_len ({self.max_model_len}) so that every prompt fits one step")

    @property
    def num_speculative_tokens(self) -> int:
        """Tokens the MTP layer drafts per step; 0 without speculation."""
        return self.speculative_config["num_speculative_tokens"] if self.speculative_config else 0

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """auto: bf16 on CUDA; on a CPU, what its instruction set makes fastest (kernels.auto_cpu_dtype)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else kernels.auto_cpu_dtype()
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]

    def kernel_config(self, device: torch.device) -> KernelConfig:
        """The kernels this engine's model runs, resolved against the machine."""
        fused = None if self.enforce_eager is None else not self.enforce_eager  # ranks too: models/parallel_fused.py
        kc = KernelConfig.from_options(cpu_kernels=self.cpu_kernels, fused_decode=fused,
                                       ffn_chunk_tokens=self.ffn_chunk_tokens or 0)
        return kc.resolve(device)


SPEC_METHODS = ("mtp",)
SPEC_FIELDS = ("method", "num_speculative_tokens", "disable_by_batch_size")


def check_speculative_config(spec: dict | str | None) -> dict | None:
    """The speculative_config as a dict (JSON text is parsed), checked field by field (vLLM's names)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a dict like {{'method': 'mtp', 'num_speculative_tokens': 2}}, "
                         f"got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"speculative_config has unknown field(s) {', '.join(unknown)}; known: {', '.join(SPEC_FIELDS)}")
    method, k = spec.get("method", "mtp"), spec.get("num_speculative_tokens")
    if method not in SPEC_METHODS:
        raise ValueError(f"speculative_config.method must be one of {SPEC_METHODS}, got {method!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 8:
        raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in 1..8, got {k!r}")
    pause = spec.get("disable_by_batch_size")
    if pause is not None and (isinstance(pause, bool) or not isinstance(pause, int) or pause < 1):
        raise ValueError(f"speculative_config.disable_by_batch_size must be a positive integer or null, got {pause!r}")
    return {"method": method, "num_speculative_tokens": k} | ({} if pause is None else {"disable_by_batch_size": pause})
