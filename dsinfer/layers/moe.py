"""DeepSeekMoE: a router picks top-k routed experts per token; shared experts see every token."""
import torch
import torch.nn.functional as F
from torch import nn

from dsinfer import kernels
from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.linear import Matmul, widened
from dsinfer.layers.mlp import MLP, silu_and_mul, swiglu
from dsinfer.layers.quant_linear import ROW_BUCKET, dequantize_into, padded, stack_fits_bf16


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, kc: KernelConfig = PLAIN):
        super().__init__()
        self.kernel = kc.cpu_kernels
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if self.method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)
        self.register_buffer("one", torch.ones((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights [T, k] fp32, expert ids [T, k]) and, if counts [E] (int64) is given, adds 1 to each
        chosen expert's entry. A decode-sized batch goes to the CPU kernel (one call instead of ~20 torch ops);
        the rest takes `plain`, which defines the result."""
        if x.dtype != torch.float32:
            x = x.float()
        if self.kernel and kernels.route_usable(x, self.weight):
            return kernels.route(x, self.weight, self.e_score_correction_bias, counts, self.top_k, self.n_group,
                                 self.topk_group, self.method, self.scoring, self.norm_topk_prob, self.scale)
        weights, ids = self.plain(x)
        if counts is not None:
            counts.index_put_((ids.flatten(),), self.one, accumulate=True)
        return weights, ids

    def plain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing in torch ops. The correction bias only changes which experts are chosen; weights always
        come from the unbiased scores. Groups are ranked by their best score (no bias) or the sum of their two
        best biased scores (noaux_tc)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.method != "greedy" and self.n_group > 1:
            choice = self.limit_groups(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return (weights if self.scale == 1.0 else weights * self.scale), ids

    def limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        if self.method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(-1)
        drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, group_score.topk(self.topk_group).indices, False)
        return grouped.masked_fill(drop[..., None], float("-inf")).flatten(1)


class Experts(nn.Module):
    """Routed experts stacked as [E, 2I, D] and [E, D, I]; work is grouped by expert, one matmul each."""

    def __init__(self, n: int, hidden: int, inter: int, kc: KernelConfig = PLAIN):
        super().__init__()
        self.n, self.inter = n, inter
        self.matmul, self.decode_kernel, self.prefill_kernel = Matmul(kc), kc.cpu_kernels, kc.moe_prefill
        self.grouped_mm, self.amx = kc.grouped_mm, kc.amx_experts and kernels.amx_ready()
        self.bf16_tiles, self.activation = kc.bf16_prefill_tiles, swiglu(kc)
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each token's experts' outputs [T, D]. A decode-sized batch goes to the fused CPU
        kernel (one call, every active expert's weights read once), a larger fp32 one to the prefill kernel (one
        call, no [T, 2I] intermediate), quantized ones on a bf16 CPU to `dequantized`; the rest runs grouped by
        expert, which defines the result."""
        if self.decode_kernel and widened(x):
            return self(x.float(), weights, ids).to(x.dtype)
        if self.decode_kernel and kernels.moe_usable(x, self.gate_up_proj):
            return kernels.moe_decode(x, ids, weights.float(), self.gate_up_proj, self.down_proj)
        if self.prefill_kernel and kernels.moe_prefill_usable(x, self.gate_up_proj):
            return kernels.moe_prefill(x, ids, weights.float(), self.gate_up_proj, self.down_proj)
        if self.grouped_mm and x.is_cpu and x.dtype == torch.bfloat16 and self.same_dtype(x):
            return self.stacked(x, weights, ids)
        if self.bf16_tiles and stack_fits_bf16(self.gate_up_proj, x) and stack_fits_bf16(self.down_proj, x):
            return self.dequantized(x, weights, ids)
        return self.grouped(x, weights, ids)

    def same_dtype(self, x: torch.Tensor) -> bool:
        """Whether the expert weights are plain tensors of x's dtype (quantized ones go to `grouped`)."""
        return isinstance(self.gate_up_proj, torch.Tensor) and self.gate_up_proj.dtype == x.dtype

    def by_expert(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (token, choice) pairs of ids [T, K] sorted by expert, stably: (order of the flattened pairs,
        tokens per expert [E], the token of each sorted pair). Ids >= E (none of ours) would sort last."""
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        return order, torch.bincount(flat, minlength=self.n)[:self.n], order // ids.shape[1]

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each expert gathers its own tokens and adds its weighted output into the result, so activations never
        exceed one expert's."""
        order, counts, token = self.by_expert(ids)
        scale = weights.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                rows = token[start:start + c]
                h = silu_and_mul(self.matmul(x.index_select(0, rows), self.gate_up_proj[e]))
                out.index_add_(0, rows, self.matmul(h.mul_(scale[start:start + c]), self.down_proj[e]))
                start += c
        return out

    def stacked(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`grouped` with all experts' products in one torch._grouped_mm per matrix (oneDNN's bf16 kernels on
        CPU), the (token, expert) pairs sorted by expert as there and added into the result in the same order."""
        order, counts, token = self.by_expert(ids)
        offs = counts.cumsum(0).to(torch.int32)
        h = self.expert_products(x.index_select(0, token), self.gate_up_proj, offs)
        h = self.activation(h, weights.flatten()[order])
        y = self.expert_products(h, self.down_proj, offs)
        return torch.zeros_like(x).index_add_(0, token, y)

    def expert_products(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x [T, K] sorted by expert (offs: the running ends) times each expert's w [N, K]: on dsinfer's AMX kernel
        where the model was built for it and the shapes fit, else torch._grouped_mm."""
        if self.amx and kernels.amx_grouped_usable(x, w):
            return kernels.amx_grouped_mm(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    def dequantized(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`grouped` for quantized experts in bf16 (KernelConfig.bf16_prefill_tiles): x rounded to bf16 once,
        each active expert's two matrices expanded whole into one expert's bf16 buffers (never more: the memory
        bound), two bf16 matmuls (2-4x fp32's rate on AMX), the gate/up activation and the output in fp32 (or
        x's dtype), added in `grouped`'s order. Each expert multiplies its rows padded to a multiple of
        ROW_BUCKET (quant_linear.padded_rows says why) by reading on into the next expert's rows, whose results
        are dropped. Per expert rather than torch._grouped_mm over several experts' buffers: that measured no
        faster, and would need several experts in bf16 at once."""
        order, counts, token = self.by_expert(ids)
        spare = token.new_zeros(ROW_BUCKET)  # rows past the last expert's, for its padding
        xs = x.to(torch.bfloat16).index_select(0, torch.cat([token, spare]))
        scale = torch.cat([weights.flatten()[order].float(), spare.float()])[:, None]
        gate_up = torch.empty(self.gate_up_proj.shape[1:], dtype=torch.bfloat16)
        down = torch.empty(self.down_proj.shape[1:], dtype=torch.bfloat16)
        out, start = torch.zeros_like(x), 0
        for e, c in enumerate(counts.tolist()):
            if c:
                rows = slice(start, start + padded(c))
                h = self.bf16_product(xs[rows], dequantize_into(self.gate_up_proj[e], gate_up))
                plain = self.activation is silu_and_mul  # which computes in fp32 here
                h = self.activation(h.float() if plain else h, scale[rows]).to(torch.bfloat16)
                y = self.bf16_product(h, dequantize_into(self.down_proj[e], down))[:c]
                out.index_add_(0, token[start:start + c], y.to(x.dtype))
                start += c
        return out

    def bf16_product(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T for one expert's bf16 buffer: on the AMX kernel where the model has it (no repacking of w),
        else torch's matmul."""
        if self.amx and kernels.amx_grouped_usable(x, w[None]):
            return kernels.amx_grouped_mm(x, w[None], x.new_tensor([x.shape[0]], dtype=torch.int32))
        return F.linear(x, w)

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        views, i = {}, self.inter
        for e in range(self.n):
            views[f"{prefix}{e}.gate_proj.weight"] = self.gate_up_proj.data[e, :i]
            views[f"{prefix}{e}.up_proj.weight"] = self.gate_up_proj.data[e, i:]
            views[f"{prefix}{e}.down_proj.weight"] = self.down_proj.data[e]
        return views


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, kc: KernelConfig = PLAIN):
        super().__init__()
        self.gate = Router(cfg, kc)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, kc)
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, inter, kc) if inter else None
        self.register_buffer("expert_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x, self.expert_counts)  # the router counts the chosen experts
        y = self.experts(x, weights, ids)
        return y if self.shared_experts is None else y + self.shared_experts(x)
