"""GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, each time spreading the rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

With H = sum over calibration tokens of x x^T, the output error of a quantized W' is tr((W - W') H (W - W')^T).
Quantizing column i with error e_i and updating the rest by -e_i * Hinv[i, i:] / Hinv[i, i] is the optimal
correction for that error (the OBS update); Hinv is the upper Cholesky factor of H^-1. Columns are taken in
order of decreasing H[i, i] (activation order), and each group's scale is fixed from the original weights
first ("static groups"), so the groups stay contiguous and need no g_idx reordering at load time."""
import torch

from dsinfer.quant.qtensor import expand_groups, symmetric_scales


def output_error(w: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T): the summed squared output error over the tokens that built H."""
    d = (w - w_q).double()
    return float(((d @ h.double()) * d).sum())


def inverse_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; the damping grows until H is positive
    definite."""
    mean_diag = h.diagonal().mean().clamp_min(1e-8)
    for attempt in range(6):
        eye = torch.eye(h.shape[0], dtype=h.dtype) * damp * mean_diag * 10 ** attempt
        lower, info = torch.linalg.cholesky_ex(h + eye)
        if not info:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise ValueError("the calibration Hessian is not positive definite even with heavy damping")


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         act_order: bool = True, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K], h [K, K] -> (codes int8 [N, K], scales fp32 [N, groups]); scales are rounded to fp16, the
    precision the GPTQ layout stores them in."""
    w = w.float().clone()
    n, k = w.shape
    h = h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = symmetric_scales(w, bits, group_size).half().float()
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    col_scale = expand_groups(scales, k, group_size)[:, order]
    hinv = inverse_hessian(h, damp)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.empty(n, k)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hb = w[:, i1:i2], hinv[i1:i2, i1:i2]
        err = torch.empty(n, i2 - i1)
        for i in range(i2 - i1):
            col, s = w1[:, i], col_scale[:, i1 + i]
            qc = (col / s).round().clamp(lo, hi)
            q[:, i1 + i] = qc
            err[:, i] = (col - qc * s) / hb[i, i]
            w1[:, i:] -= err[:, i:i + 1] * hb[i:i + 1, i:]
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    codes = torch.empty(n, k, dtype=torch.int8)
    codes[:, order] = q.to(torch.int8)
    return codes, scales
