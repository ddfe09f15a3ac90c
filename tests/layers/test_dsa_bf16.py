"""KernelConfig.dsa_bf16: a bf16 DSA model's indexer scores and gathered attention, one query (or a few) at a
time as bf16 matmuls, against the plain batched path over the same inputs."""
import pytest
import torch

from dsinfer.config import ModelConfig
from dsinfer.kernels import KernelConfig
from dsinfer.layers.indexer import Indexer
from dsinfer.layers.sparse_attention import gathered_attention, gathered_attention_bf16

H, R, DR, K, ROWS = 8, 64, 16, 48, 200


def picks(t: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows [t, K] and which count: every query's picks distinct, the first queries with some dropped."""
    rows = torch.stack([torch.randperm(ROWS, generator=g)[:K] for _ in range(t)])
    valid = torch.ones(t, K, dtype=torch.bool)
    valid[0, K // 2:] = False
    valid[1, ::3] = False
    return rows, valid


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_gathered_attention_bf16_is_the_batched_path_within_bf16_rounding(cache_dtype):
    g = torch.Generator().manual_seed(0)
    t = 7
    cache = torch.randn(ROWS, R + DR, generator=g).bfloat16().to(cache_dtype)
    qc = torch.randn(t, H, R + DR, generator=g).bfloat16()
    rows, valid = picks(t, g)
    ours = gathered_attention_bf16(qc, rows, valid, cache, R, 0.2)
    plain = gathered_attention(qc, rows, valid, cache, R, 0.2)
    exact = gathered_attention(qc.float(), rows, valid, cache.float(), R, 0.2)
    assert ours.dtype == torch.bfloat16 and ours.shape == (t, H, R)
    torch.testing.assert_close(ours.float(), plain.float(), rtol=0.02, atol=0.02)
    assert (ours.float() - exact).abs().max() <= 2 * (plain.float() - exact).abs().max() + 1e-3
    assert (ours[0] != gathered_attention_bf16(qc, rows, torch.ones_like(valid), cache, R, 0.2)[0]).any()


def indexer(dsa_bf16: bool, heads: int = 8, dim: int = 32, topk: int = 10) -> Indexer:
    cfg = ModelConfig("deepseek_v32", 64, 48, 1, 4, 32, 16, 16, 16, 64, q_lora_rank=24, index_n_heads=heads,
                      index_head_dim=dim, index_topk=topk)
    return Indexer(cfg, KernelConfig(dsa_bf16=dsa_bf16))


def sets(picked: torch.Tensor, positions: torch.Tensor) -> list[set[int]]:
    return [{int(i) for i in row if i <= p} for row, p in zip(picked, positions)]


def test_indexer_bf16_picks_the_fp32_top_k_where_scores_are_exact():
    """Products of -1 / 0 / 1 values are exact in bf16, so the two paths' scores agree and so must the sets."""
    g = torch.Generator().manual_seed(1)
    n = 70
    q = torch.randint(-1, 2, (n, 8, 32), generator=g).bfloat16()
    keys = torch.randint(-1, 2, (n, 32), generator=g).bfloat16()
    w, pos = torch.randn(n, 8, generator=g), torch.arange(n)
    fast, plain = indexer(True).select(q, w, keys, pos), indexer(False).select(q, w, keys, pos)
    assert fast.shape == plain.shape == (n, 10)
    assert sets(fast, pos) == sets(plain, pos)


def test_indexer_bf16_keeps_nearly_the_same_keys_on_random_scores():
    g = torch.Generator().manual_seed(2)
    n, topk = 300, 64
    q, keys = torch.randn(n, 8, 32, generator=g).bfloat16(), torch.randn(n, 32, generator=g).bfloat16()
    w, pos = torch.randn(n, 8, generator=g), torch.arange(n)
    fast = sets(indexer(True, topk=topk).select(q, w, keys, pos), pos)
    plain = sets(indexer(False, topk=topk).select(q, w, keys, pos), pos)
    assert all(len(a) == len(b) == min(topk, p + 1) for a, b, p in zip(fast, plain, pos.tolist()))
    shared = sum(len(a & b) for a, b in zip(fast, plain)) / sum(len(b) for b in plain)
    assert shared > 0.97


def test_indexer_bf16_switch_leaves_fp32_queries_on_the_plain_path():
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(20, 8, 32, generator=g), torch.randn(20, 32, generator=g)
    w, pos = torch.randn(20, 8, generator=g), torch.arange(20)
    assert torch.equal(indexer(True).select(q, w, keys, pos), indexer(False).select(q, w, keys, pos))


def test_plain_kernel_config_has_dsa_bf16_off():
    assert KernelConfig().dsa_bf16 and not KernelConfig(cpu_kernels=False).dsa_bf16
