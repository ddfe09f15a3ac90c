import math

import pytest
import torch

from dsinfer.layers.rope import RotaryEmbedding, apply_rope, softmax_scale

YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707,
            mscale_all_dim=0.707)


def test_yarn_frequencies_and_attention_factor_match_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                   mscale=0.707, mscale_all_dim=0.707)
    cfg = DeepseekV3Config(rope_scaling=scaling, max_position_embeddings=163840)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    ours = RotaryEmbedding(64, 10000.0, scaling)
    assert torch.allclose(ours.inv_freq, inv_freq, rtol=1e-6) and ours.attention_factor == pytest.approx(factor)


def test_softmax_scale_carries_mscale_squared():
    scaling = dict(type="yarn", factor=40.0, mscale=0.707, mscale_all_dim=0.707)
    m = 0.1 * 0.707 * math.log(40) + 1
    assert softmax_scale(192, scaling) == pytest.approx(192 ** -0.5 * m * m)
    assert softmax_scale(192, None) == pytest.approx(192 ** -0.5)


def test_interleaved_pairs_rotate_together():
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    cis = torch.complex(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert apply_rope(x, cis).tolist() == [[0.0, 1.0, 0.0, 1.0]]  # pair 0 turns by 90 degrees, pair 1 stays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_turn_equals_cos_sin_formula(dtype):
    rot = RotaryEmbedding(16, 10000.0, None)
    positions = torch.tensor([0, 3, 17, 500])
    x = torch.randn(4, 3, 48).to(dtype)[..., 32:]  # the rope slice of a query, not contiguous
    freqs = positions[:, None].float() * rot.inv_freq
    cos, sin = freqs.cos()[:, None].to(dtype), freqs.sin()[:, None].to(dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    want = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, rot.rotation(positions)), want)


def test_rotation_is_kept_for_the_same_positions_only():
    rot = RotaryEmbedding(8, 10000.0, None)
    a, b = torch.tensor([1, 2]), torch.tensor([5, 6])
    assert rot.rotation(a) is rot.rotation(a)
    torch.testing.assert_close(rot.rotation(b), RotaryEmbedding(8, 10000.0, None).rotation(b))


@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
def test_the_position_table_gives_the_computed_turns_bit_for_bit(scaling):
    """On the CPU turns come from a table grown on demand; they must be the very numbers computed directly."""
    rot, g = RotaryEmbedding(64, 10000.0, scaling), torch.Generator().manual_seed(0)
    for n, top in [(1, 10), (3, 900), (9, 1500), (2, 5000), (33, 5000)]:  # the table grows past 1024, then 3000
        positions = torch.randint(0, top, (n,), generator=g)
        assert torch.equal(rot.rotation(positions), rot.turns(positions))
    assert rot._table.shape[0] > 3000
