"""Ranks 1..N-1 of a tensor-parallel engine, and rank 0's side of them. The scheduler, block manager and sampler
run on rank 0 only; rank 0's model is wrapped in a Leader, which sends every forward and logits call to the
other ranks before making it, and each other rank makes the same call on its slices of the weights (follow).
The ranks' latent caches hold the same rows, since the latent projections are replicated: rank 0 sends the
cache's size once, and any block it writes outside a forward (the prefix cache's disk tier)."""
import dataclasses
import os
import sys
import traceback

import torch

from dsinfer.engine import parallel_group, step_message
from dsinfer.engine.config import EngineConfig
from dsinfer.engine.kv_cache import KVCache
from dsinfer.engine.loading import load_engine_model
from dsinfer.layers.attention import AttentionMetadata


class Leader:
    """Rank 0's model as the engine sees it: calls go to every rank; everything else is the model's own."""

    def __init__(self, model, team: parallel_group.Team):
        # steps_with_logits: forward_logits sends a step and its logits rows as one message (a packed channel)
        self.__dict__.update(module=model, team=team, engine_caches=None, steps_with_logits=team.channel.packed)

    def __getattr__(self, name):
        return getattr(self.module, name)

    def __call__(self, input_ids, positions, meta: AttentionMetadata, caches):
        scratch = None if caches is self.engine_caches else [(tuple(c.shape), c.dtype) for c in caches]
        self.team.send(("forward", cpu(input_ids), cpu(positions), cpu(meta), scratch))
        return self.team.call(self.module, input_ids, positions, meta, caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.team.send(("logits", cpu(hidden)))
        return self.team.call(self.module.compute_logits, hidden)

    def forward_logits(self, input_ids, positions, meta: AttentionMetadata, caches, rows: torch.Tensor):
        """The logits at `rows` of a step's final hidden states: the step and its rows go to the other ranks as
        one packed message, so they compute their logit slices without waiting for another."""
        if caches is not self.engine_caches:
            return self.compute_logits(self(input_ids, positions, meta, caches)[rows])
        self.team.send_words(step_message.pack(input_ids, positions, meta, rows))
        hidden = self.team.call(self.module, input_ids, positions, meta, caches)
        return self.team.call(self.module.compute_logits, hidden[rows])

    def share_cache(self, cache: KVCache):
        """The other ranks allocate the same cache; blocks rank 0 writes outside a forward are sent to them."""
        self.engine_caches = cache.layers
        self.team.send(("cache", cache.kv_dtype, cache.num_blocks, cache.block_size))
        write = cache.write_block

        def write_everywhere(block_id: int, rows: list[torch.Tensor]):
            self.team.send(("write_block", block_id, [cpu(r) for r in rows]))
            write(block_id, rows)
        cache.write_block = write_everywhere


def cpu(x):
    """x with its tensors on the CPU, for the channel (a no-op on a CPU engine)."""
    if isinstance(x, AttentionMetadata):
        return dataclasses.replace(x, **{f.name: cpu(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x.cpu() if isinstance(x, torch.Tensor) else x


def on(x, device: torch.device):
    if isinstance(x, AttentionMetadata):
        return dataclasses.replace(x, **{f.name: on(getattr(x, f.name), device) for f in dataclasses.fields(x)})
    return x.to(device) if isinstance(x, torch.Tensor) else x


@torch.inference_mode()
def follow(model, channel: parallel_group.Channel, device: torch.device):
    """Makes rank 0's calls on this rank's slices until it says stop."""
    cache = None
    while True:
        msg = channel.recv()
        if isinstance(msg, torch.Tensor):
            run_step(model, msg, cache, device)
            continue
        kind, *args = msg
        if kind == "stop":
            return
        if kind == "forward":
            ids, positions, meta, scratch = (on(a, device) for a in args)
            caches = cache.layers if scratch is None else [torch.zeros(s, dtype=d, device=device) for s, d in scratch]
            model(ids, positions, meta, caches)
        elif kind == "logits":
            model.compute_logits(args[0].to(device))
        elif kind == "cache":
            cache = KVCache(model.config, args[0], device, args[1], args[2])
        elif kind == "write_block":
            cache.write_block(args[0], [r.to(device) for r in args[1]])


def run_step(model, words: torch.Tensor, cache: KVCache, device: torch.device):
    """A packed step (Leader.forward_logits): the forward into the engine's cache, then its rows' logits."""
    ids, positions, meta, rows = step_message.unpack(words, device)
    hidden = model(ids, positions, meta, cache.layers)
    if rows is not None:
        model.compute_logits(hidden[rows])


def run_spawned(rank: int, size: int, port: int, messages, threads: int, cores: list[int], cfg: EngineConfig):
    """A worker process started by rank 0 (parallel_group.spawn): binds itself to its cores, joins, loads its
    slices, reports, follows."""
    try:
        parallel_group.bind(cores)
        torch.set_num_threads(threads)
        messages.put(("hello", rank))
        device = cfg.torch_device()
        store = parallel_group.client_store(port, size)
        shard, channel = parallel_group.join(store, rank, size, cfg.enable_expert_parallel, device,
                                             cfg.pack_step_messages)
        loaded = load_engine_model(cfg, shard)
        messages.put(("ready", rank))
    except BaseException:
        messages.put(("error", rank, traceback.format_exc()))
        sys.exit(1)
    try:
        follow(loaded.model, channel, loaded.device)
    except BaseException:  # rank 0 reports it, or is gone
        messages.put(("error", rank, traceback.format_exc()))
        sys.exit(1)
    parallel_group.shutdown(shard, channel)


def start(cfg: EngineConfig):
    """Rank 0's Team and Shard for a tensor-parallel engine: worker processes started here, or, under torchrun,
    the group torchrun started (on ranks other than 0 this runs the worker and ends the process)."""
    device = cfg.torch_device()
    if not parallel_group.under_torchrun():
        return parallel_group.spawn(cfg.tensor_parallel_size, run_spawned, (cfg,), device, cfg.enable_expert_parallel,
                                    cfg.bind_cores, cfg.pack_step_messages)
    rank, store = parallel_group.torchrun_store(cfg.tensor_parallel_size)
    local_rank, local_size = parallel_group.torchrun_local()
    torch.set_num_threads(parallel_group.cpu_share(local_size))  # counted before binding narrows what it sees
    bound = parallel_group.bind(parallel_group.core_shares(local_size)[local_rank] if cfg.bind_cores else [])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    shard, channel = parallel_group.join(store, rank, cfg.tensor_parallel_size, cfg.enable_expert_parallel, device,
                                         cfg.pack_step_messages)
    if rank:
        loaded = load_engine_model(cfg, shard)
        follow(loaded.model, channel, loaded.device)
        parallel_group.shutdown(shard, channel)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the rank's work ends with rank 0's: nothing of the caller's script runs on
    team = parallel_group.Team(shard, channel)
    team.store, team.bound = store, bound
    return team
