"""KernelConfig: which of dsinfer's own kernels a model runs. Made once per LLM from its options (environment
variables are read here and nowhere else), resolved against what this machine can run, and handed to the
layers when the model is built: each layer binds its implementation then, so two models in one process with
different settings never affect each other."""
import logging
import os
from dataclasses import dataclass, fields, replace

import torch

from dsinfer.kernels.grouped_mm import amx_ready
from dsinfer.kernels.lib import cpu_flags, library

log = logging.getLogger("dsinfer")
CPU_DTYPE_ENV = "DSINFER_CPU_DTYPE"
ENV = {"cpu_kernels": "DSINFER_CPU_KERNELS", "fused_decode": "DSINFER_FUSED_DECODE",
       "small_gemm": "DSINFER_SMALL_GEMM", "moe_prefill": "DSINFER_MOE_PREFILL",
       "int8_activations": "DSINFER_INT8_ACTIVATIONS", "vnni": "DSINFER_VNNI", "grouped_mm": "DSINFER_GROUPED_MM",
       "amx_experts": "DSINFER_AMX_EXPERTS", "bf16_prefill_tiles": "DSINFER_BF16_PREFILL_TILES",
       "fused_swiglu": "DSINFER_FUSED_SWIGLU", "dsa_bf16": "DSINFER_DSA_BF16",
       "token_parallel": "DSINFER_TOKEN_PARALLEL", "wide_steps": "DSINFER_WIDE_STEPS"}
SWITCHES = tuple(name for name in ENV if name != "cpu_kernels")


@dataclass(slots=True, frozen=True)
class KernelConfig:
    cpu_kernels: bool = True       # the C kernels where a call's shapes fit them; off: torch everywhere
    fused_decode: bool = True      # a decode batch through each whole layer in one C call (needs cpu_kernels)
    small_gemm: bool = True        # fp32 matmuls of 9-64 rows in C (quantized w: the decode kernel, 8 rows a pass)
    moe_prefill: bool = True       # prefill MoE / MLP layers in one C call, no [T, 2I] intermediate
    int8_activations: bool = True  # quantized decode matmuls round x to int8 and multiply in integers
    vnni: bool = True              # ... with VNNI's byte dot products (AVX-VNNI or AVX512-VNNI), where the CPU has them
    grouped_mm: bool = True        # 16-bit prefill experts: two torch._grouped_mm calls instead of two per expert
    amx_experts: bool = True       # ... and those two calls on dsinfer's AMX tiles (weights as stored, no repacking)
    bf16_prefill_tiles: bool = True  # quantized prefill matmuls dequantize tiles to bf16, multiply in bf16 (AMX)
    fused_swiglu: bool = True      # 16-bit prefill MLPs: silu(gate) * up (* routing weight) in one C pass, one rounding
    dsa_bf16: bool = True          # bf16 DSA models: indexer scores and gathered attention one query at a time (AMX)
    token_parallel: bool = True    # fused decode of a layer whose token fits one core's L2: threads split tokens
    wide_steps: bool = True        # fused steps of 9-16 tokens read each fp32 / bf16 weight once, not twice
    ffn_chunk_tokens: int = 256    # tokens per MLP pass of the torch path (0: all at once)

    def __post_init__(self):
        if not self.cpu_kernels:  # every other switch picks among the kernels
            for name in SWITCHES:
                object.__setattr__(self, name, False)

    @classmethod
    def from_options(cls, **given) -> "KernelConfig":
        """Options given as None fall back to their environment variable (0 turns a switch off), then to the
        default."""
        values = {name: _env_switch(var) for name, var in ENV.items()}
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**{k: v for k, v in values.items() if v is not None})

    def resolve(self, device: torch.device) -> "KernelConfig":
        """This configuration less what cannot run here: every kernel off where the device is not a CPU or the
        library cannot be built."""
        if self.ffn_chunk_tokens is None or self.ffn_chunk_tokens < 0:
            raise ValueError(f"ffn_chunk_tokens must be >= 0, got {self.ffn_chunk_tokens}")
        runs = torch.device(device).type == "cpu" and library() is not None
        kc = self if runs else replace(self, cpu_kernels=False)
        if not has_vnni(cpu_flags()):
            kc = replace(kc, vnni=False)
        if not hasattr(torch, "_grouped_mm"):
            kc = replace(kc, grouped_mm=False)
        if not (kc.grouped_mm and amx_ready()):
            kc = replace(kc, amx_experts=False)
        if not cpu_flags() & BF16_FLAGS:  # elsewhere bf16 matmuls are emulated, far slower than fp32
            kc = replace(kc, bf16_prefill_tiles=False)
        log.info("kernels: %s (CPU: %s)", kc.describe(), " ".join(sorted(cpu_flags())) or "unknown")
        return kc

    @property
    def int8_kernel(self) -> int:
        """Which integer-activation kernel quantized decode matmuls run: 0 none (fp32 activations), 1 AVX2,
        2 AVX-VNNI, 3 AVX512-VNNI (the same dot product, EVEX-encoded, where the CPU lacks AVX-VNNI)."""
        if not self.int8_activations:
            return 0
        flags = cpu_flags()  # checked here too: an unresolved config must never pick an instruction the CPU lacks
        return 1 if not (self.vnni and has_vnni(flags)) else 2 if "avx_vnni" in flags else 3

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


PLAIN = KernelConfig(cpu_kernels=False)  # the torch reference every kernel is tested against
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def has_vnni(flags: frozenset[str]) -> bool:
    """Whether the CPU has vpdpbusd on 256-bit vectors: AVX-VNNI, or AVX512-VNNI with AVX512VL."""
    return "avx_vnni" in flags or {"avx512_vnni", "avx512vl"} <= flags
CPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def auto_cpu_dtype() -> torch.dtype:
    """What dtype="auto" means on this CPU: bf16 where it multiplies bf16 natively (AMX or AVX512-BF16, where
    torch's bf16 matmul runs 2-7x fp32's rate and the weights are half the bytes), fp32 elsewhere (there bf16
    matmuls are emulated, 10-500x slower). $DSINFER_CPU_DTYPE (float32 or bfloat16) overrides the choice."""
    forced = os.environ.get(CPU_DTYPE_ENV)
    if forced is not None:
        if forced not in CPU_DTYPES:
            raise ValueError(f"{CPU_DTYPE_ENV} must be one of {', '.join(CPU_DTYPES)}, got {forced!r}")
        return CPU_DTYPES[forced]
    return torch.bfloat16 if cpu_flags() & BF16_FLAGS else torch.float32


def _env_switch(var: str) -> bool | None:
    value = os.environ.get(var)
    if value is None:
        return None
    if value.strip() not in ("0", "1"):
        log.warning("%s=%r is neither 0 nor 1; it is ignored", var, value)
        return None
    return value.strip() == "1"
