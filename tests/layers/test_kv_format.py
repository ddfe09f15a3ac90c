"""The latent cache's row formats (layers/kv_format.py) against their definitions."""
import pytest
import torch

from dsinfer.layers import kv_format


def reference_fp8(latent: torch.Tensor, k_pe: torch.Tensor):
    """Per 128 latent values: scale = max|x| / 448, code = e4m3(x / scale); rope in bf16. Written out group by
    group: (dequantized latent, scales, rope)."""
    t, r = latent.shape
    out, scales = torch.empty(t, r), []
    for g0 in range(0, r, 128):
        part = latent[:, g0:g0 + 128]
        s = part.abs().amax(-1, keepdim=True) / 448
        scales.append(s)
        out[:, g0:g0 + 128] = (part / s).to(torch.float8_e4m3fn).float() * s
    return out, torch.cat(scales, -1), k_pe.to(torch.bfloat16).float()


@pytest.mark.parametrize("r,dr", [(512, 64), (20, 6), (300, 8)])
def test_fp8_rows_follow_the_layout(r, dr):
    g = torch.Generator().manual_seed(r)
    latent, k_pe = torch.randn(7, r, generator=g) * 3, torch.randn(7, dr, generator=g)
    rows = kv_format.encode_fp8(latent, k_pe)
    assert rows.dtype == torch.uint8 and rows.shape == (7, kv_format.row_bytes("fp8", r, dr))
    want_latent, want_scales, want_rope = reference_fp8(latent, k_pe)
    ng = -(-r // 128)
    torch.testing.assert_close(rows[:, r:r + 4 * ng].contiguous().view(torch.float32), want_scales)
    back = kv_format.decode_fp8(rows, r)
    torch.testing.assert_close(back[:, :r], want_latent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back[:, r:], want_rope)
    assert float((back[:, :r] - latent).abs().max() / latent.abs().max()) < 1 / 16  # e4m3: 3 mantissa bits


def test_656_bytes_at_deepseeks_shapes():
    assert kv_format.row_bytes("fp8", 512, 64) == 656
    assert kv_format.row_bytes("float32", 512, 64) == 2304 and kv_format.row_bytes("bfloat16", 512, 64) == 1152


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "fp8"])
def test_written_rows_read_back(kv_dtype):
    cache = kv_format.allocate(kv_dtype, 12, 20, 6, "cpu")
    latent, k_pe = torch.randn(3, 20), torch.randn(3, 6)
    kv_format.write_rows(cache, torch.tensor([5, 0, 9]), latent, k_pe)
    back = kv_format.read_rows(cache, torch.tensor([[9, 5]]), 20, torch.float32)
    assert back.shape == (1, 2, 26)
    tol = {"float32": 0, "bfloat16": 1e-2, "fp8": 0.1}[kv_dtype]
    torch.testing.assert_close(back[0, 1], torch.cat([latent[0], k_pe[0]]), rtol=tol, atol=tol)
    torch.testing.assert_close(back[0, 0], torch.cat([latent[2], k_pe[2]]), rtol=tol, atol=tol)


def test_auto_follows_the_model_dtype():
    assert kv_format.resolve("auto", torch.float32) == "float32"
    assert kv_format.resolve("auto", torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_format.resolve("fp4", torch.float32)
