"""Training-free block-sparse attention: the kept set against a plain reference written from the definition,
attention over it against dense attention masked to it, block summaries as blocks fill, config errors."""
import pytest
import torch
import torch.nn.functional as F

from dsinfer.config import ModelConfig
from dsinfer.layers.attention import AttentionMetadata
from dsinfer.layers.block_sparse import BlockSparseMLA, SparseConfig, update_summaries

BS, L = 4, 61
SP = SparseConfig(sink=3, window=6, topk_blocks=2)


def layer():
    torch.manual_seed(0)
    cfg = ModelConfig("deepseek_v3", 64, 32, 1, 2, 16, 8, 8, 8, 64, q_lora_rank=None)
    mla = BlockSparseMLA(cfg, "auto", None, sparse=SP)
    for p in mla.parameters():
        p.data.normal_(0, 0.3)
    return mla


def meta_for(n):
    return AttentionMetadata(1, n, [n], [n], torch.arange(n), torch.arange(-(-n // BS) * BS)[None],
                             torch.zeros(n, dtype=torch.long))


def reference(mla, x):
    """Dense attention, decompressed, each query masked to sink + window + its best topk_blocks blocks, the
    blocks scored by max over heads of the absorbed query . the block's mean cached row."""
    n, cache = x.shape[0], torch.zeros(-(-x.shape[0] // BS) * BS, mla.r + mla.dr)
    q = mla.q_proj(x).view(n, mla.h, -1)
    q_nope, q_pe = mla.rope_and_cache(q, mla.kv_a_proj_with_mqa(x), mla.rotary.rotation(torch.arange(n)), cache,
                                      torch.arange(n))
    w = mla.kv_b_proj.weight.view(mla.h, mla.dn + mla.dv, mla.r)
    qc = torch.cat([torch.einsum("thd,hdr->thr", q_nope, w[:, :mla.dn]), q_pe], -1)
    means = cache.view(-1, BS, cache.shape[1]).mean(1)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for p in range(n):
        mask[p, :min(SP.sink, p + 1)] = True
        mask[p, max(0, p - SP.window + 1):p + 1] = True
        cands = [b for b in range(len(means)) if b * BS <= p - SP.window and (b + 1) * BS > SP.sink]
        scores = {b: (qc[p] @ means[b]).max().item() for b in cands}
        for b in sorted(cands, key=scores.get, reverse=True)[:SP.topk_blocks]:
            for s in range(b * BS, (b + 1) * BS):
                mask[p, s] |= SP.sink <= s <= p - SP.window
    kv = (cache[:n, :mla.r] @ mla.kv_b_proj.weight.T).view(n, mla.h, -1)
    k = torch.cat([kv[..., :mla.dn], cache[:n, None, mla.r:].expand(n, mla.h, mla.dr)], -1)
    o = F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], -1).transpose(0, 1), k.transpose(0, 1),
                                       kv[..., mla.dn:].transpose(0, 1), attn_mask=mask, scale=mla.scale)
    return mla.o_proj(o.transpose(0, 1).flatten(1)), mask


@torch.no_grad()
def test_block_sparse_equals_dense_attention_masked_to_the_kept_set():
    mla = layer()
    x = torch.randn(L, 32)
    latent, summary = torch.zeros(-(-L // BS) * BS, mla.r + mla.dr), torch.zeros(-(-L // BS), mla.r + mla.dr)
    ours = mla(x, torch.arange(L), meta_for(L), (latent, summary))
    ref, mask = reference(mla, x)
    assert mask.sum(1).max() < L // 2  # really sparse
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_prefill_and_decode_keep_what_one_pass_keeps():
    mla = layer()
    x = torch.randn(L, 32)
    whole = mla(x, torch.arange(L), meta_for(L), (torch.zeros(64, 24), torch.zeros(16, 24)))
    latent, summary, parts = torch.zeros(64, 24), torch.zeros(16, 24), []
    for s, e in ((0, 13), (13, 40), *((i, i + 1) for i in range(40, L))):
        n = e - s
        meta = AttentionMetadata(int(n > 1), n if n > 1 else 0, [n], [e], torch.arange(s, e), torch.arange(64)[None],
                                 torch.zeros(n, dtype=torch.long))
        parts.append(mla(x[s:e], torch.arange(s, e), meta, (latent, summary)))
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)


def test_summaries_are_block_means_as_blocks_fill():
    latent, summary = torch.randn(16, 5), torch.zeros(4, 5)
    update_summaries(latent, summary, torch.tensor([4, 5]), 3)                 # block 1 holds 2 rows so far
    torch.testing.assert_close(summary[1], latent[4:6].mean(0))
    update_summaries(latent, summary, torch.tensor([6, 7, 8]), 3)             # block 1 full, block 2 begun
    torch.testing.assert_close(summary[1], latent[4:8].mean(0))
    torch.testing.assert_close(summary[2], latent[8])


@pytest.mark.parametrize("bad, match", [({"sink": -1}, "sink"), ({"window": 0}, "window"),
                                        ({"topk": 3}, "unknown sparse_attention field"), ([1], "dict")])
def test_bad_sparse_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        SparseConfig.from_dict(bad)
