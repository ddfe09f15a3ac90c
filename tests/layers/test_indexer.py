"""The lightning indexer against a plain-torch reference of DeepSeek-V3.2's math, written from its definition:
LayerNorm key, NeoX rope on the first qk_rope_head_dim values, Hadamard rotation of q and k, per-head weights
scaled by H^-1/2 D^-1/2, score = sum_h w relu(q . k), causal top-k."""
import math

import pytest
import torch

from dsinfer.config import ModelConfig
from dsinfer.layers.indexer import Indexer
from dsinfer.layers.rope import RotaryEmbedding

H, D, DR, TOPK, HIDDEN, QR = 8, 32, 16, 10, 48, 24


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def neox(x, pos, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, DR, 2, dtype=torch.float64) / DR)
    ang = pos[:, None].double() * inv                                     # [T, DR / 2]
    shape = (ang.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[1],)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    a, b, rest = x[..., :DR // 2], x[..., DR // 2:DR], x[..., DR:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], -1)


def reference_topk(ix: Indexer, x, qr, pos_q, keys_x, pos_k):
    """DeepSeek's indexer in float64, one query at a time."""
    q = neox((qr.double() @ ix.wq_b.weight.double().T).view(-1, H, D), pos_q) @ hadamard(D).double()
    k = torch.nn.functional.layer_norm(keys_x.double() @ ix.wk.weight.double().T, (D,),
                                       ix.k_norm.weight.double(), ix.k_norm.bias.double(), 1e-6)
    k = neox(k, pos_k) @ hadamard(D).double()
    w = (x.double() @ ix.weights_proj.weight.double().T) * H ** -0.5 * D ** -0.5
    out = []
    for t in range(q.shape[0]):
        score = (w[t, :, None] * (q[t] @ k.T).relu()).sum(0)
        seen = int(pos_q[t]) + 1
        out.append(set(score[:seen].topk(min(TOPK, seen)).indices.tolist()))
    return out


def test_indexer_top_k_equals_deepseek_reference():
    torch.manual_seed(0)
    cfg = ModelConfig("deepseek_v32", 64, HIDDEN, 1, 4, 32, 16, DR, 16, 64, q_lora_rank=QR, index_n_heads=H,
                      index_head_dim=D, index_topk=TOPK)
    ix = Indexer(cfg)
    for p in ix.parameters():
        p.data.normal_()
    rotary = RotaryEmbedding(DR, 10000.0, None)
    n = 60
    x, qr, pos = torch.randn(n, HIDDEN), torch.randn(n, QR), torch.arange(n)
    keys = ix.keys(x, rotary.rotation(pos))
    q, w = ix.queries(x, qr, rotary.rotation(pos))
    picks = ix.select(q, w, keys, pos)
    ref = reference_topk(ix, x, qr, pos, x, pos)
    for t in range(n):
        ours = {int(i) for i in picks[t] if i <= t}
        assert ours == ref[t], t
    assert picks.shape == (n, TOPK)
