import torch

from dsinfer.layers.norm import RMSNorm


def test_fused_fp32_norm_equals_the_formula():
    norm = RMSNorm(64, 1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(5, 64) * 3
    want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), want)


def test_bf16_norm_rounds_before_scaling_as_transformers_does():
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(5, 64).to(torch.bfloat16)
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), want)
