import pytest
import torch
from safetensors.torch import load_file

from dsinfer.quant.fp8 import check_fp8_config, dequantize_fp8
from tests.checkpoints import FP8_BLOCK
from tests.reference import fp8_block_dequant


def random_fp8(rows, cols, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(torch.float8_e4m3fn)
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    return w, torch.rand(grid, generator=g) * 4 + 0.25  # scales far from 1, so that dividing is not multiplying


@pytest.mark.parametrize("rows, cols, block", [
    (300, 200, (128, 128)),  # partial last tiles in both dims
    (256, 384, (128, 128)),  # whole tiles only
    (100, 57, (128, 128)),  # one partial tile smaller than the block
    (61, 45, (28, 20)),  # not square: swapping the block sizes changes the answer
])
def test_dequantize_multiplies_each_tile_with_partial_edges(rows, cols, block):
    w, s = random_fp8(rows, cols, block)
    assert torch.equal(dequantize_fp8(w, s, block, "w"), fp8_block_dequant(w, s, block))


def test_reference_dequantization_by_hand():
    """The tests' reference itself, on a case worked out by hand: a 3x3 weight in 2x2 tiles."""
    w = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., -1.]]).to(torch.float8_e4m3fn)
    s = torch.tensor([[2., 10.], [0.5, 3.]])
    want = torch.tensor([[2., 4., 30.], [8., 10., 60.], [3.5, 4., -3.]])
    assert torch.equal(fp8_block_dequant(w, s, (2, 2)), want)
    assert torch.equal(dequantize_fp8(w, s, (2, 2), "w"), want)


def test_fp8_checkpoint_has_partial_tiles_and_dequantizes_to_its_reference(ckpts):
    """Every FP8 weight of the test checkpoint ends in a partial tile in both dims, and dsinfer's dequantization
    of it equals the fp32 copy that transformers reads in the exactness tests."""
    fp8, ref = load_file(ckpts["v3-fp8"] / "model.safetensors"), load_file(ckpts["v3-fp8-ref"] / "model.safetensors")
    names = [n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert len(names) > 20
    for name in names:
        rows, cols = fp8[name].shape
        assert rows % FP8_BLOCK[0] and cols % FP8_BLOCK[1], name
        got = dequantize_fp8(fp8[name], fp8[name + "_scale_inv"], tuple(FP8_BLOCK), name)
        assert torch.equal(got, ref[name]), name


def test_scale_grid_uses_ceil_division():
    w = torch.zeros(129, 1, dtype=torch.float8_e4m3fn)
    assert dequantize_fp8(w, torch.ones(2, 1), (128, 128), "w").shape == (129, 1)
    with pytest.raises(ValueError, match=r"w_scale_inv has shape \(1, 1\), expected \(2, 1\)"):
        dequantize_fp8(w, torch.ones(1, 1), (128, 128), "w")


def test_fp8_config_checks():
    assert check_fp8_config({"quant_method": "fp8", "weight_block_size": [128, 128]}) == (128, 128)
    with pytest.raises(ValueError, match="weight_block_size"):
        check_fp8_config({"quant_method": "fp8", "weight_block_size": [128]})
