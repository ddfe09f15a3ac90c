"""Long contexts: DeepSeek sparse attention (DSA) against dense attention over the same weights.

    python benchmarks/long_context.py [--contexts 2048 8192 16384 32768] [--prefill 2048 8192] [--steps 8]
        [--dtype bfloat16] [--attention dense | sparse]
    python benchmarks/long_context.py --model DIR --quantization int8 \
        --sparse '{"sink": 64, "window": 1024, "topk_blocks": 64}'

Default: a model with DeepSeek-V3.2's real attention and indexer shapes (hidden 7168, 128 heads, q_lora_rank
1536, kv_lora_rank 512, rope 64, indexer 64 heads x 128, index_topk 2048), 2 layers of a small MoE (8 experts of
256, 2 per token, 1 shared), vocabulary 1024, random weights in --dtype (fp32 by default; the cache takes the
same dtype), built in memory by this script. --attention runs only dense or only the sparse side. With --model
and --sparse: that checkpoint (e.g. v2lite-4L) dense against the training-free sparse mode.

- decode: tok/s at one stream, the median of --steps steps, on a cache filled with random latent rows and
  indexer keys (a decode step's cost does not depend on their values), so long contexts need no prefill;
- prefill: seconds to prefill a random prompt of that length from an empty cache in 2,048-token chunks (as the
  engine's chunked prefill does), only for the contexts in --prefill (long dense prefills take minutes here);
- KV bytes per token over all layers, indexer keys included, from the cache and from the formula."""
import argparse
import copy
import json
import statistics
import time

import torch

from dsinfer.config import ModelConfig
from dsinfer.engine.config import EngineConfig
from dsinfer.engine.kv_cache import KVCache
from dsinfer.engine.model_runner import ModelRunner
from dsinfer.layers import kv_format
from dsinfer.layers.block_sparse import BlockSparseMLA, SparseConfig, write_summaries
from dsinfer.models import build_model, load_model
from dsinfer.models.loader import read_config

V32 = dict(model_type="deepseek_v32", vocab_size=1024, hidden_size=7168, num_hidden_layers=2, num_attention_heads=128,
           q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
           intermediate_size=2048, moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, norm_topk_prob=True,
           routed_scaling_factor=2.5, max_position_embeddings=163840, index_n_heads=64, index_head_dim=128,
           index_topk=2048, rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
CHUNK = 2048


def random_v32(kc, dtype: torch.dtype):
    cfg = ModelConfig.from_dict(V32)
    model = build_model(cfg, dtype, torch.device("cpu"), "auto", kc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return cfg, model


class Modes:
    """Switches a model between dense and sparse attention over the same weights: the V3.2 indexer on or off,
    or each layer's MLA against a BlockSparseMLA sharing its parameters."""

    def __init__(self, model, cache: KVCache, sparse: SparseConfig | None):
        self.model, self.cache = model, cache
        self.dense_attn = [layer.self_attn for layer in model.model.layers]
        self.sparse_attn = [twin(a, sparse) for a in self.dense_attn] if sparse else None

    def set(self, sparse: bool):
        if self.sparse_attn is None:
            self.model.set_indexer(sparse)
            return self.cache.model_caches()
        for layer, d, s in zip(self.model.model.layers, self.dense_attn, self.sparse_attn):
            layer.self_attn = s if sparse else d
        return self.cache.model_caches() if sparse else self.cache.layers


def twin(mla, sparse: SparseConfig) -> BlockSparseMLA:
    """A BlockSparseMLA over mla's own weights (a shallow copy: quantized weights are not parameters)."""
    s = copy.copy(mla)
    s.__class__, s.sparse = BlockSparseMLA, sparse
    return s


def fill(cache: KVCache, tokens: int):
    g = torch.Generator().manual_seed(1)
    for t in cache.tensors:
        t[:tokens] = torch.randn(tokens, t.shape[1], generator=g).to(t.dtype)
    blocks = torch.arange(-(-tokens // cache.block_size))
    for layer, summary in zip(cache.layers, cache.summaries):
        write_summaries(layer, summary, blocks, torch.full_like(blocks, cache.block_size), cache.r)


@torch.inference_mode()
def decode_rate(runner, caches, context: int, steps: int) -> float:
    inputs = runner.inputs([([5], context, list(range(-(-(context + 1) // runner.cache.block_size))))])
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        runner.model(*inputs, caches)
        times.append(time.perf_counter() - t0)
    return 1 / statistics.median(times[1:])


@torch.inference_mode()
def prefill_seconds(runner, caches, context: int) -> float:
    ids = torch.randint(3, 1000, (context,), generator=torch.Generator().manual_seed(2)).tolist()
    table = list(range(-(-context // runner.cache.block_size)))
    t0 = time.perf_counter()
    for start in range(0, context, CHUNK):
        runner.model(*runner.inputs([(ids[start:start + CHUNK], start, table)]), caches)
    return time.perf_counter() - t0


def kv_formula(cfg: ModelConfig, kv_dtype: str) -> int:
    """Bytes per token written out: per layer the latent row (kv_lora_rank + rope values, or fp8's 656 bytes at
    DeepSeek's shapes) and the indexer key (index_head_dim values, fp32 beside an fp32 cache, else bf16)."""
    if kv_dtype == "fp8":
        latent = cfg.kv_lora_rank + 4 * -(-cfg.kv_lora_rank // 128) + 2 * cfg.qk_rope_head_dim
    else:
        latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (4 if kv_dtype == "float32" else 2)
    index = cfg.index_head_dim * (4 if kv_dtype == "float32" else 2) if cfg.has_indexer else 0
    return cfg.num_hidden_layers * (latent + index)


def build(args, kc):
    if args.model is None:
        cfg, model = random_v32(kc, getattr(torch, args.dtype))
        return cfg, model, None, "DSA"
    cfg = read_config(args.model)
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, cfg, dtype, torch.device("cpu"), "auto", kc, args.quantization)[0]
    return cfg, model, SparseConfig.from_dict(json.loads(args.sparse)), "sparse"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    p.add_argument("--prefill", type=int, nargs="*", default=[2048, 8192])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default=None, help="a checkpoint without an indexer, run with --sparse")
    p.add_argument("--sparse", default='{"sink": 64, "window": 1024, "topk_blocks": 64}')
    p.add_argument("--dtype", default="float32", help="the model's compute dtype (the cache's too)")
    p.add_argument("--attention", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"],
                   help="which of the two to run (both by default)")
    p.add_argument("--quantization", default=None, help="int8 / int4: the --model's weights quantized on load")
    args = p.parse_args()
    kc = EngineConfig.from_kwargs().kernel_config(torch.device("cpu"))
    t0 = time.time()
    cfg, model, sparse, name = build(args, kc)
    longest = max(args.contexts + args.prefill) + 1
    kv_dtype = kv_format.resolve("auto", model.model.norm.weight.dtype)
    cache = KVCache(cfg, kv_dtype, "cpu", -(-longest // 16), 16, block_summaries=sparse is not None)
    modes, runner = Modes(model, cache, sparse), ModelRunner.__new__(ModelRunner)
    runner.model, runner.cache, runner.device = model, cache, cache.device
    runner.offsets = torch.arange(cache.block_size)
    print(f"built in {time.time() - t0:.0f} s; KV bytes per token: {cache.bytes_per_token} (cache, {kv_dtype}), "
          f"{kv_formula(cfg, kv_dtype)} (formula); fp32 {kv_formula(cfg, 'float32')}, "
          f"bf16 {kv_formula(cfg, 'bfloat16')}, "
          f"fp8 {kv_formula(cfg, 'fp8')}", flush=True)
    print(f"\n| attention | context | decode tok/s | prefill s |\n|---|---:|---:|---:|")
    rates = {}
    runs = [a if a == "dense" else name for a in args.attention]
    for attn in runs:
        caches = modes.set(attn != "dense")
        for c in args.contexts:
            fill(cache, c + 1)
            rates[attn, c] = decode_rate(runner, caches, c, args.steps)
            pre = f"{prefill_seconds(runner, caches, c):.1f}" if c in args.prefill else "skipped"
            print(f"| {attn} | {c} | {rates[attn, c]:.2f} | {pre} |", flush=True)
    lo, hi = min(args.contexts), max(args.contexts)
    for attn in runs:
        print(f"{attn}: decode at {hi} is {100 * rates[attn, hi] / rates[attn, lo]:.0f}% of decode at {lo}")


if __name__ == "__main__":
    main()
