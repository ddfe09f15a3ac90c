import pytest
import torch

from dsinfer.quant.fp8 import check_fp8_config, dequantize_fp8


def test_dequantize_multiplies_each_128_tile_with_partial_edges():
    torch.manual_seed(0)
    w = torch.randn(300, 200).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2) + 0.5
    out = dequantize_fp8(w, s, (128, 128), "w")
    for i in range(300):
        for j in (0, 127, 128, 199):
            assert out[i, j] == w[i, j].float() * s[i // 128, j // 128]


def test_scale_grid_uses_ceil_division():
    w = torch.zeros(129, 1, dtype=torch.float8_e4m3fn)
    assert dequantize_fp8(w, torch.ones(2, 1), (128, 128), "w").shape == (129, 1)
    with pytest.raises(ValueError, match=r"w_scale_inv has shape \(1, 1\), expected \(2, 1\)"):
        dequantize_fp8(w, torch.ones(1, 1), (128, 128), "w")


def test_fp8_config_checks():
    assert check_fp8_config({"quant_method": "fp8", "weight_block_size": [128, 128]}) == (128, 128)
    with pytest.raises(ValueError, match="weight_block_size"):
        check_fp8_config({"quant_method": "fp8", "weight_block_size": [128]})
