"""dsinfer's MLA absorbed-decode kernel against plain torch attention over the gathered latent cache."""
import pytest
import torch

from dsinfer import kernels
from dsinfer.layers import kv_format

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernel cannot be built on this machine")

SHAPES = [(1, 8, 0), (4, 64, 16), (16, 512, 64), (3, 13, 5)]  # H, R, DR


def reference(q, cache, rows, seq, lens, scale, r):
    ctx = cache.float().index_select(0, rows.reshape(-1)).view(*rows.shape, cache.shape[1])[seq]  # [T, L, D]
    scores = torch.bmm(q, ctx.transpose(1, 2)) * scale                                            # [T, H, L]
    past = torch.arange(rows.shape[1])[None, :] >= lens[:, None]
    probs = scores.masked_fill(past[:, None, :], float("-inf")).softmax(-1)
    return torch.bmm(probs, ctx[..., :r])


def case(h, r, dr, t, lmax, b, dtype, seed, n_cache=None):
    """Random q and cache; b sequences of lmax distinct cache rows; token i in sequence i % b."""
    g = torch.Generator().manual_seed(seed)
    d = r + dr
    n_cache = n_cache or b * lmax + 7
    q = torch.randn(t, h, d, generator=g)
    cache = torch.randn(n_cache, d, generator=g).to(dtype)
    rows = torch.stack([torch.randperm(n_cache, generator=g)[:lmax] for _ in range(b)])
    seq = torch.arange(t) % b
    lens = torch.randint(1, lmax + 1, (t,), generator=g)
    lens[0], lens[-1] = lmax, 1
    return q, cache, rows, seq, lens, d ** -0.5


def check(q, cache, rows, seq, lens, scale, r):
    got = kernels.mla_decode(q, cache, rows, seq, lens, scale, r)
    torch.testing.assert_close(got, reference(q, cache, rows, seq, lens, scale, r), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,r,dr", SHAPES)
@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("b", [1, 3])  # 1: all tokens share one sequence
def test_equals_torch(dtype, h, r, dr, t, b):
    check(*case(h, r, dr, t, lmax=37, b=b, dtype=dtype, seed=h * 100 + r + dr + t), r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,r,dr", SHAPES)
def test_long_context_is_split_and_merged(dtype, h, r, dr):
    q, cache, rows, seq, lens, scale = case(h, r, dr, t=1, lmax=3000, b=1, dtype=dtype, seed=7, n_cache=3000)
    check(q, cache, rows, seq, lens, scale, r)
    with_threads(4, lambda: check(q, cache, rows, seq, lens, scale, r))  # more chunks than cores


def test_contexts_past_the_chunk_cap_take_longer_chunks():
    q, cache, rows, seq, lens, scale = case(4, 64, 16, t=2, lmax=6000, b=2, dtype=torch.float32, seed=11, n_cache=6000)
    check(q, cache, rows, seq, torch.tensor([6000, 4097]), scale, 64)  # 16 chunks each: the cap


def test_mixed_long_and_short_contexts():
    q, cache, rows, seq, lens, scale = case(16, 512, 64, t=5, lmax=1500, b=2, dtype=torch.bfloat16, seed=3)
    lens = torch.tensor([1500, 3, 700, 64, 1])
    check(q, cache, rows, seq, lens, scale, 512)


def test_many_heads_and_more_threads_than_tokens():
    q, cache, rows, seq, lens, scale = case(128, 64, 16, t=3, lmax=400, b=2, dtype=torch.bfloat16, seed=4)
    with_threads(8, lambda: check(q, cache, rows, seq, lens, scale, 64))


def test_large_scores_stay_finite():
    """Scores in the hundreds: the online softmax must subtract the running max."""
    q, cache, rows, seq, lens, _ = case(4, 64, 16, t=3, lmax=500, b=3, dtype=torch.float32, seed=5)
    check(q * 30, cache, rows, seq, lens, 1.0, 64)


def with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        fn()
    finally:
        torch.set_num_threads(old)


def test_out_of_range_row_index_raises():
    q, cache, rows, seq, lens, scale = case(4, 64, 16, t=2, lmax=20, b=2, dtype=torch.float32, seed=1)
    for bad in (cache.shape[0], -1):
        broken = rows.clone()
        broken[seq[0], int(lens[0]) - 1] = bad
        with pytest.raises(ValueError, match="outside the cache"):
            kernels.mla_decode(q, cache, broken, seq, lens, scale, 64)
    broken = rows.clone()
    broken[:, -1] = cache.shape[0] + 5  # past every token's lens: never read, so fine
    lens = torch.tensor([19, 19])
    torch.testing.assert_close(kernels.mla_decode(q, cache, broken, seq, lens, scale, 64),
                               reference(q, cache, rows, seq, lens, scale, 64), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("bad", [0, 21, -3])
def test_lens_outside_1_to_lmax_raises(bad):
    q, cache, rows, seq, lens, scale = case(4, 64, 16, t=2, lmax=20, b=2, dtype=torch.float32, seed=1)
    lens[1] = bad
    with pytest.raises(ValueError, match="lens must be in 1..Lmax"):
        kernels.mla_decode(q, cache, rows, seq, lens, scale, 64)


def test_wrong_dtypes_and_shapes_raise():
    q, cache, rows, seq, lens, scale = case(4, 64, 16, t=2, lmax=20, b=2, dtype=torch.float32, seed=1)
    bad = [
        (q.half(), cache, rows, seq, lens, "q must be fp32"),
        (q, cache.half(), rows, seq, lens, "cache must be fp32 or bf16"),
        (q, cache[:, :40], rows, seq, lens, "cache must be"),
        (q, cache, rows.int(), seq, lens, "rows must be int64"),
        (q, cache, rows[0], seq, lens, "rows must be int64"),
        (q, cache, rows, seq.int(), lens, "seq must be int64"),
        (q, cache, rows, seq, lens.float(), "lens must be int64"),
        (q, cache, rows, seq[:1], lens, "seq and lens must have"),
        (q, cache, rows, seq + 1, lens, "seq in 0..B-1"),
    ]
    for args in bad:
        with pytest.raises(ValueError, match=args[-1]):
            kernels.mla_decode(*args[:-1], scale, 64)


def test_non_contiguous_inputs_are_made_contiguous():
    q, cache, rows, seq, lens, scale = case(3, 13, 5, t=3, lmax=30, b=3, dtype=torch.float32, seed=2)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    rows_t = rows.t().contiguous().t()
    check(q_t, cache, rows_t, seq, lens, scale, 13)


def test_usable_only_for_cpu_fp32_queries_and_contiguous_cache(monkeypatch):
    q, cache = torch.randn(2, 4, 80), torch.randn(10, 80)
    assert kernels.mla_usable(q, cache) and kernels.mla_usable(q, cache.bfloat16())
    assert not kernels.mla_usable(q.bfloat16(), cache)
    assert not kernels.mla_usable(q, cache.t().contiguous().t())
    assert not kernels.mla_usable(q[0], cache)


def fp8_case(h, r, dr, t, lmax, b, seed, n_cache=None):
    """case() with the cache in fp8 rows (layers/kv_format.py), and its dequantized fp32 twin for the reference."""
    q, cache, rows, seq, lens, scale = case(h, r, dr, t, lmax, b, torch.float32, seed, n_cache)
    packed = kv_format.encode_fp8(cache[:, :r] * 3, cache[:, r:])  # * 3: scales other than 1
    return q, packed, kv_format.decode_fp8(packed, r), rows, seq, lens, scale


@pytest.mark.parametrize("h,r,dr", SHAPES + [(2, 300, 8)])  # 300: a partial scale group, odd byte offsets
@pytest.mark.parametrize("t,lmax", [(1, 37), (3, 37), (8, 37), (1, 3000)])
def test_fp8_cache_equals_torch_over_the_dequantized_rows(h, r, dr, t, lmax):
    q, packed, plain, rows, seq, lens, scale = fp8_case(h, r, dr, t, lmax, b=2, seed=h + r + t,
                                                        n_cache=2 * lmax + 7)
    got = kernels.mla_decode(q, packed, rows, seq, lens, scale, r)
    torch.testing.assert_close(got, reference(q, plain, rows, seq, lens, scale, r), rtol=1e-5, atol=1e-5)  # |x| ~ 9


def test_fp8_cache_of_the_wrong_width_is_refused():
    q, packed, _, rows, seq, lens, scale = fp8_case(4, 64, 16, t=2, lmax=20, b=2, seed=1)
    with pytest.raises(ValueError, match="fp8 uint8"):
        kernels.mla_decode(q, packed[:, :-2].contiguous(), rows, seq, lens, scale, 64)
