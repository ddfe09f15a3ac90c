"""Speculative sampling (engine/rejection.py): over many draws on a small vocabulary, the emitted tokens follow
the target distribution whatever the draft distribution is (chi-square bounds)."""
import pytest
import torch

from dsinfer import SamplingParams
from dsinfer.engine.rejection import accept_greedy, accept_sampled, distribution, draw
from dsinfer.engine.sampler import filter_logits

V, K, N = 6, 2, 20000
CHI2_5DF = 25.7  # chi-square with 5 degrees of freedom exceeds this with probability 1e-4


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected.clamp(min=1e-9)).sum())


def drafts_of(kind: str, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Draft distributions [K, V] unlike the target in different ways."""
    if kind == "same":
        return p[:K].clone()
    if kind == "other":
        return torch.softmax(torch.randn(K, V, generator=g) * 2, -1)
    if kind == "opposite":  # most mass where the target has least
        return torch.softmax(-4 * p[:K].log(), -1)
    return torch.nn.functional.one_hot(torch.tensor([2, 4]), V).float()  # "point": always the same tokens


@pytest.mark.parametrize("kind", ["same", "other", "opposite", "point"])
def test_emitted_tokens_follow_the_target(kind):
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, -1)
    q = drafts_of(kind, p, g)
    first, second, drafted = torch.zeros(V), torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        drafts = [draw(q[j], g) for j in range(K)]
        out = accept_sampled(p, q, drafts, g)
        first[out[0]] += 1
        drafted[drafts[0]] += 1
        if len(out) > 1:  # the first draft was accepted: the next token answers the target's next position
            second[out[1]] += 1
    assert chi2(first, p[0]) < CHI2_5DF
    if second.sum() > 1000:
        assert chi2(second, p[1]) < CHI2_5DF
    if kind != "same":  # the test has power: the drafts themselves do not pass it
        assert chi2(drafted, p[0]) > 10 * CHI2_5DF


def test_seeded_draws_repeat():
    p = torch.softmax(torch.randn(K + 1, V), -1)
    q = torch.softmax(torch.randn(K, V), -1)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        runs.append([accept_sampled(p, q, [draw(q[0], g), draw(q[1], g)], g) for _ in range(50)])
    assert runs[0] == runs[1]


def test_greedy_accepts_the_prefix_equal_to_the_argmax():
    target = torch.tensor([[0, 5.0, 1], [3.0, 0, 1], [0, 0, 2.0]])
    assert accept_greedy(target, [1, 0]) == [1, 0, 2]
    assert accept_greedy(target, [1, 2]) == [1, 0]
    assert accept_greedy(target, [0, 0]) == [1]


def test_distribution_is_the_samplers():
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05)
    want = filter_logits(logits / 0.7, [type("S", (), {"params": params})()] * 3).softmax(-1)
    torch.testing.assert_close(distribution(logits, params), want)
    assert ((distribution(logits, params) > 0).sum(-1) <= 10).all()
