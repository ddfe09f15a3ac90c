import itertools

import pytest
import torch

from dsinfer import kernels
from dsinfer.config import ModelConfig
from dsinfer.kernels import KernelConfig
from dsinfer.layers.mlp import silu_and_mul
from dsinfer.layers.moe import Experts, Router

BASE = dict(model_type="deepseek_v3", vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
            kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, intermediate_size=8,
            moe_intermediate_size=4, n_routed_experts=8, num_experts_per_tok=2)


def router(cpu_kernels: bool = True, **kw) -> Router:
    r = Router(ModelConfig.from_dict({**BASE, **kw}), KernelConfig(cpu_kernels=cpu_kernels))
    torch.nn.init.normal_(r.weight)
    return r


def call(r: Router, x: torch.Tensor, cpu_kernels: bool):
    """r(x), in chunks of at most MAX_M tokens (each taking the kernel) when the kernels are on."""
    if not cpu_kernels:
        return r(x)
    parts = []
    for chunk in x.split(kernels.MAX_M):
        assert kernels.route_usable(chunk, r.weight)
        parts.append(r(chunk))
    return torch.cat([w for w, _ in parts]), torch.cat([i for _, i in parts])


on_off = pytest.mark.parametrize("cpu_kernels", [True, False])


def brute_force(scores, bias, n_group, topk_group, k, by_top2):
    """Tries every allowed set of groups, then the best k experts inside them: the definition, slowly."""
    choice = scores + (bias if bias is not None else 0)
    per = len(scores) // n_group
    groups = [choice[g * per:(g + 1) * per] for g in range(n_group)]
    rank = [g.topk(2).values.sum() if by_top2 else g.max() for g in groups]
    keep = sorted(range(n_group), key=lambda g: -rank[g])[:topk_group]
    allowed = [e for e in range(len(scores)) if e // per in keep]
    return sorted(sorted(allowed, key=lambda e: -choice[e])[:k])


@pytest.mark.parametrize("method, scoring, n_group", [("greedy", "softmax", 1), ("group_limited_greedy", "softmax", 4),
                                                      ("noaux_tc", "sigmoid", 4), ("noaux_tc", "sigmoid", 1)])
@on_off
def test_selection_matches_definition(method, scoring, n_group, cpu_kernels):
    r = router(cpu_kernels, topk_method=method, scoring_func=scoring, n_group=n_group, topk_group=min(2, n_group), num_experts_per_tok=3)
    if method == "noaux_tc":
        r.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(64, 8)
    _, ids = call(r, x, cpu_kernels)
    logits = x @ r.weight.T
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    for t in range(64):
        want = brute_force(scores[t], r.e_score_correction_bias, n_group, r.topk_group, 3, method == "noaux_tc")
        assert sorted(ids[t].tolist()) == want


@on_off
def test_bias_changes_selection_never_weights(cpu_kernels):
    r = router(cpu_kernels, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5)
    x = torch.randn(32, 8)
    r.e_score_correction_bias.zero_()
    r.e_score_correction_bias[3] = 10.0  # expert 3 always chosen, but weighted by its plain score
    w, ids = call(r, x, cpu_kernels)
    assert (ids == 3).any(-1).all()
    plain = (x @ r.weight.T).sigmoid()
    assert torch.allclose(w, plain.gather(1, ids) * 2.5)


@on_off
def test_norm_topk_prob_and_scaling(cpu_kernels):
    r = router(cpu_kernels, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    w, _ = call(r, torch.randn(16, 8), cpu_kernels)
    assert torch.allclose(w.sum(-1), torch.full((16,), 2.5))
    r = router(cpu_kernels, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
               routed_scaling_factor=16.0)
    x = torch.randn(16, 8)
    w, ids = call(r, x, cpu_kernels)
    assert torch.allclose(w, (x @ r.weight.T).softmax(-1).gather(1, ids) * 16)


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_experts_batched_equal_token_by_token(cpu_kernels):
    torch.manual_seed(0)
    ex = Experts(8, 16, 12, KernelConfig(cpu_kernels=cpu_kernels))
    torch.nn.init.normal_(ex.gate_up_proj)
    torch.nn.init.normal_(ex.down_proj)
    tokens = 40 if not cpu_kernels else kernels.MAX_M  # decode-sized batches take the fused kernel
    x, ids = torch.randn(tokens, 16), torch.stack([torch.randperm(8)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3)
    y = ex(x, weights, ids)
    ref = torch.zeros_like(x)
    for t, j in itertools.product(range(tokens), range(3)):
        e = ids[t, j]
        ref[t] += weights[t, j] * (silu_and_mul(ex.gate_up_proj[e] @ x[t]) @ ex.down_proj[e].T)
    assert torch.allclose(y, ref, atol=1e-4)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_bf16_grouped_mm_prefill_equals_one_matmul_per_expert():
    """KernelConfig.grouped_mm: the stacked path sums the same pairs in the same order as `grouped`; only the
    matmuls' own bf16 rounding may differ."""
    torch.manual_seed(1)
    ex = Experts(8, 64, 48, KernelConfig(grouped_mm=True))
    torch.nn.init.normal_(ex.gate_up_proj, std=0.1)
    torch.nn.init.normal_(ex.down_proj, std=0.1)
    ex.to(torch.bfloat16)
    ex.gate_up_proj.data[3] = 0  # an expert nobody picks: an empty group
    tokens = 70
    ids = torch.stack([torch.tensor([0, 1, 2, 4, 5, 6, 7])[torch.randperm(7)[:3]] for _ in range(tokens)])
    x, weights = torch.randn(tokens, 64).bfloat16(), torch.rand(tokens, 3)
    assert ex.grouped_mm
    y = ex(x, weights, ids)
    ex.grouped_mm = False
    ref = ex(x, weights, ids)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert (y.float() - ref.float()).abs().mean() < 5e-3


ROUTE_CONFIGS = [  # method, scoring, n_group, topk_group, norm_topk_prob, scale, bf16 weight
    ("greedy", "softmax", 1, 1, False, 1.0, False),
    ("greedy", "softmax", 1, 1, True, 2.5, True),
    ("group_limited_greedy", "softmax", 4, 2, False, 2.5, False),
    ("group_limited_greedy", "softmax", 4, 2, True, 1.0, True),
    ("noaux_tc", "sigmoid", 4, 2, True, 2.5, False),
    ("noaux_tc", "sigmoid", 4, 2, False, 1.0, True),
    ("noaux_tc", "sigmoid", 1, 1, True, 1.0, False),
    ("noaux_tc", "sigmoid", 1, 1, False, 2.5, True),
]


@pytest.mark.parametrize("method, scoring, n_group, topk_group, norm, scale, bf16", ROUTE_CONFIGS)
@pytest.mark.parametrize("hidden", [37, 64])
def test_route_kernel_matches_plain(method, scoring, n_group, topk_group, norm, scale, bf16, hidden):
    torch.manual_seed(hidden)
    r = router(hidden_size=hidden, n_routed_experts=16, num_experts_per_tok=3, topk_method=method,
               scoring_func=scoring, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
               routed_scaling_factor=scale)
    if method == "noaux_tc":
        r.e_score_correction_bias.normal_(0, 0.3)
    if bf16:
        r.weight.data = r.weight.data.to(torch.bfloat16)
    for t in range(1, kernels.MAX_M + 1):
        x = torch.randn(t, hidden)
        assert kernels.route_usable(x, r.weight)
        w, ids = r(x)
        pw, pids = r.plain(x)
        assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape == (t, 3)
        a, b = ids.argsort(-1), pids.argsort(-1)
        assert torch.equal(ids.gather(1, a), pids.gather(1, b))
        assert torch.allclose(w.gather(1, a), pw.gather(1, b), rtol=1e-5, atol=1e-5)


@on_off
def test_router_counts_each_choice_once(cpu_kernels):
    r = router(cpu_kernels, topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2, num_experts_per_tok=3)
    counts = torch.zeros(8, dtype=torch.long)
    x = torch.randn(kernels.MAX_M, 8)
    _, ids = r(x, counts)
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=8))
    _, ids2 = r(x)  # no counts: nothing counted
    assert torch.equal(ids, ids2) and counts.sum() == 3 * kernels.MAX_M


def test_route_rejects_bad_arguments():
    x, w = torch.randn(2, 8), torch.randn(8, 8)
    args = dict(bias=None, counts=None, top_k=2, n_group=4, topk_group=2, method="noaux_tc", scoring="sigmoid",
                norm_topk_prob=True, scale=1.0)
    kernels.route(x, w, **args)  # fine as it stands
    bad = [((x.double(), w), {}), ((x, w.half()), {}), ((x, torch.randn(8, 9)), {}), ((x[0], w), {}),
           ((x, w), dict(counts=torch.zeros(8, dtype=torch.int32))),
           ((x, w), dict(counts=torch.zeros(7, dtype=torch.long))),
           ((x, w), dict(bias=torch.zeros(5))), ((x, w), dict(method="best")), ((x, w), dict(scoring="tanh")),
           ((x, w), dict(top_k=0)), ((x, w), dict(top_k=9)),
           ((x, w), dict(n_group=3)),  # 8 experts do not split into 3 groups
           ((x, w), dict(top_k=5)),  # 2 groups of 2 experts leave only 4
           ((x, w), dict(topk_group=5)), ((x, torch.randn(8, 8)[:, :0].reshape(8, 0)), {})]
    for (xx, ww), kw in bad:
        with pytest.raises(ValueError):
            kernels.route(xx, ww, **{**args, **kw})
