"""dsinfer's CPU kernels (C, AVX2 + FMA, built on first use with the system compiler and loaded with ctypes)
and their Python wrappers: matmuls for decode and small prefill batches (matmul.py), the pieces of a decode
step (decode.py), the prefill MLP (prefill.py), whole decode layers (decode_layer.py), and structured outputs'
token masks (token_mask.py). Which of them a model runs is its KernelConfig's choice (config.py); the torch path
each mirrors is what the tests compare against. Each wrapper checks its arguments and raises ValueError naming what does not fit."""
from dsinfer.kernels.config import PLAIN, KernelConfig, auto_cpu_dtype
from dsinfer.kernels.decode import (ROUTE_METHODS, absorb_usable, fused_usable, mla_absorb, mla_decode, mla_expand,
                                    mla_rope_cache, mla_usable, mlp_decode, moe_decode, moe_usable, rms_norm, route,
                                    route_usable)
from dsinfer.kernels.grouped_mm import amx_grouped_mm, amx_grouped_usable, amx_ready
from dsinfer.kernels.lib import cpu_flags, cpu_has_avx2, library
from dsinfer.kernels.matmul import (DEQUANT_DTYPES, MAX_M, SMALL_MAX_M, WIDE_M, dequant, dequant_usable, gemm_small,
                                    gemv, in_row_chunks, int8_activations_fit, q_usable, qgemv, qgemv_for,
                                    round_to_int8, small_usable, usable)
from dsinfer.kernels.prefill import (moe_prefill, moe_prefill_usable, rms_norm_bf16, rms_norm_bf16_usable, rope_bf16,
                                     rope_bf16_usable, silu_mul, silu_mul_usable)
from dsinfer.kernels.token_mask import RowArgmax, token_argmax, token_mask, token_mask_usable

__all__ = ["KernelConfig", "PLAIN", "auto_cpu_dtype", "MAX_M", "SMALL_MAX_M", "WIDE_M", "ROUTE_METHODS", "library", "cpu_flags", "cpu_has_avx2",
           "gemv", "gemm_small", "in_row_chunks", "qgemv", "dequant", "DEQUANT_DTYPES", "round_to_int8", "int8_activations_fit", "usable",
           "small_usable", "q_usable", "dequant_usable", "mla_decode", "mla_absorb", "mla_expand", "mla_usable",
           "absorb_usable", "moe_decode", "mlp_decode", "moe_usable", "moe_prefill", "moe_prefill_usable",
           "rms_norm", "mla_rope_cache", "fused_usable", "route", "route_usable", "token_mask", "token_argmax", "RowArgmax",
           "token_mask_usable", "amx_grouped_mm", "amx_grouped_usable", "amx_ready", "silu_mul", "silu_mul_usable",
           "rms_norm_bf16", "rms_norm_bf16_usable", "rope_bf16", "rope_bf16_usable"]
