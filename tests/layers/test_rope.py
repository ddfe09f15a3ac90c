import math

import pytest
import torch

from dsinfer.layers.rope import RotaryEmbedding, apply_rope, softmax_scale


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
    cos, sin = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert apply_rope(x, cos, sin).tolist() == [[0.0, 1.0, 0.0, 1.0]]  # pair 0 turns by 90 degrees, pair 1 stays
