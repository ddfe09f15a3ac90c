"""Tensor and expert parallelism: which part of each weight a rank holds, and the collectives that join the
parts. Follows DeepSeek's own inference code and vLLM: attention heads, dense and shared-expert MLPs by
intermediate, routed experts by expert (expert parallel) or by intermediate (tensor parallel), the embedding
and LM head by vocabulary; the small latent projections and the router are replicated, so that every rank
caches the same latent. Each split point ends in one collective."""
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsinfer.config import ModelConfig
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.layers.moe import Experts


@dataclass(slots=True)
class Shard:
    """This process's place in a tensor-parallel group of `size` ranks."""
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # routed experts split by expert instead of by intermediate
    group: object = None           # a torch.distributed ProcessGroup of the ranks (its own, not the default one)
    comm_seconds: float = 0.0      # time spent in collectives, for benchmarks

    def part(self, n: int, what: str) -> int:
        """n // size, or a ValueError naming what does not divide."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        return n // self.size

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of this rank's layers: its heads, and its share of every MLP's intermediate (the routed
        experts' only under tensor parallelism)."""
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.part(cfg.vocab_size, "vocab_size")
        if cfg.n_routed_experts:
            self.part(cfg.n_routed_experts if self.expert_parallel else cfg.moe_intermediate_size,
                      "n_routed_experts" if self.expert_parallel else "moe_intermediate_size")
            self.part(shared, "the shared experts' intermediate size")
        moe = cfg.moe_intermediate_size if self.expert_parallel else cfg.moe_intermediate_size // self.size
        return replace(cfg, num_attention_heads=self.part(cfg.num_attention_heads, "num_attention_heads"),
                       intermediate_size=self.part(cfg.intermediate_size, "intermediate_size"),
                       moe_intermediate_size=moe)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x, in place."""
        start = time.perf_counter()
        self.group.allreduce([x]).wait()
        self.comm_seconds += time.perf_counter() - start
        return x

    def all_agree(self, yes: bool, device: torch.device) -> bool:
        """Whether every rank says yes (a collective: every rank must call it)."""
        flag = torch.tensor([float(yes)], device=device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.group.allreduce([flag], opts).wait()
        return bool(flag.item())

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0: every rank's x joined along the last dim, in rank order; other ranks: x itself."""
        start, x = time.perf_counter(), x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.group.gather([parts] if parts else [], [x], opts).wait()
        self.comm_seconds += time.perf_counter() - start
        return torch.cat(parts, -1) if self.rank == 0 else x


SINGLE = Shard()


def vocab_embed(ids: torch.Tensor, table: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Rows of a table split by vocabulary: each rank looks up the ids in its range (zeros elsewhere) and the
    sum over ranks is the full lookup, exactly (one non-zero term per row)."""
    rows = table.shape[0]
    local = ids - shard.rank * rows
    outside = (local < 0) | (local >= rows)
    out = F.embedding(local.masked_fill(outside, 0), table)
    return shard.all_reduce(out.masked_fill_(outside[:, None], 0))


class ExpertSlice(Experts):
    """Expert parallelism: experts first .. first + n - 1 of `total`; the ranks' partial sums add up to the full
    layer. Runs grouped by expert (each active expert's weights read once, its few rows through the matmul
    kernels), skipping the other ranks' experts; the fused MoE kernels take every expert of a token."""

    def __init__(self, first: int, n: int, total: int, hidden: int, inter: int, kc: KernelConfig = PLAIN):
        super().__init__(n, hidden, inter, kc)
        self.first, self.total = first, total

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        return self.grouped(x, weights, local.masked_fill((local < 0) | (local >= self.n), self.n))  # n: not here

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        views, i = {}, self.inter
        for e in range(self.n):
            name = f"{prefix}{self.first + e}."
            views[name + "gate_proj.weight"] = self.gate_up_proj.data[e, :i]
            views[name + "up_proj.weight"] = self.gate_up_proj.data[e, i:]
            views[name + "down_proj.weight"] = self.down_proj.data[e]
        return views
