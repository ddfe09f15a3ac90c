import itertools

import pytest
import torch

from dsinfer import kernels
from dsinfer.config import ModelConfig
from dsinfer.layers.mlp import silu_and_mul
from dsinfer.layers.moe import Experts, Router

BASE = dict(model_type="deepseek_v3", vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
            kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, intermediate_size=8,
            moe_intermediate_size=4, n_routed_experts=8, num_experts_per_tok=2)


def router(**kw) -> Router:
    r = Router(ModelConfig.from_dict({**BASE, **kw}))
    torch.nn.init.normal_(r.weight)
    return r


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
def test_selection_matches_definition(method, scoring, n_group):
    r = router(topk_method=method, scoring_func=scoring, n_group=n_group, topk_group=min(2, n_group), num_experts_per_tok=3)
    if method == "noaux_tc":
        r.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(64, 8)
    _, ids = r(x)
    logits = x @ r.weight.T
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    for t in range(64):
        want = brute_force(scores[t], r.e_score_correction_bias, n_group, r.topk_group, 3, method == "noaux_tc")
        assert sorted(ids[t].tolist()) == want


def test_bias_changes_selection_never_weights():
    r = router(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5)
    x = torch.randn(32, 8)
    r.e_score_correction_bias.zero_()
    r.e_score_correction_bias[3] = 10.0  # expert 3 always chosen, but weighted by its plain score
    w, ids = r(x)
    assert (ids == 3).any(-1).all()
    plain = (x @ r.weight.T).sigmoid()
    assert torch.allclose(w, plain.gather(1, ids) * 2.5)


def test_norm_topk_prob_and_scaling():
    r = router(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    w, _ = r(torch.randn(16, 8))
    assert torch.allclose(w.sum(-1), torch.full((16,), 2.5))
    r = router(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0)
    x = torch.randn(16, 8)
    w, ids = r(x)
    assert torch.allclose(w, (x @ r.weight.T).softmax(-1).gather(1, ids) * 16)


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_experts_batched_equal_token_by_token(cpu_kernels, monkeypatch):
    monkeypatch.setitem(kernels._state, "enabled", cpu_kernels)
    torch.manual_seed(0)
    ex = Experts(8, 16, 12)
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
