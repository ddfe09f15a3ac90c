"""The processes of a tensor-parallel group and how they talk. On one machine rank 0 (the engine's own process)
starts ranks 1..N-1 as worker processes (torch.multiprocessing, spawn) and hosts the rendezvous store; under
torchrun every process is a rank already and joins through torchrun's store. The ranks share a process group of
their own (gloo; NCCL for the collectives on CUDA), not torch's default one, so that several engines can live
in one process. Rank 0 sends each call to the other ranks as one pickled message on that group (Channel).

A rank that dies closes its sockets, and the collective waiting on it fails at once (gloo reports the closed
connection): rank 0 then names the dead rank in a ParallelError and shuts the others down. Idle ranks wait for
the next message without a time limit, since a server may sit idle for hours."""
import datetime
import os
import pickle
import queue as queues
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsinfer.layers.parallel import Shard

START_SECONDS = 300  # for a rank to start (import and connect); loading after that is watched by liveness
FOREVER = datetime.timedelta(days=3650)


class ParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or could not start; the group has been shut down."""


def cpu_share(ranks_here: int) -> int:
    """Threads for one of `ranks_here` ranks on this machine: its share of the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) // ranks_here)


def core_shares(ranks_here: int) -> list[list[int]]:
    """The cores this thread may use cut into `ranks_here` equal shares, the r-th for local rank r; empty shares
    where there are fewer cores than ranks (then nothing is bound)."""
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // ranks_here
    return [cores[r * per:(r + 1) * per] for r in range(ranks_here)]


def bind(cores: list[int]) -> tuple[int, set[int]] | None:
    """Binds this thread, and the threads it starts from now on (the group's, torch's), to `cores`; returns
    what unbind needs, or None where nothing was bound. A rank that shares its cores with another rank has its
    kernels and its collectives' threads preempted by the other's, and each all-reduce waits for the slower."""
    if not cores:
        return None
    saved = (threading.get_native_id(), os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    return saved


def unbind(saved: tuple[int, set[int]] | None):
    """Gives the thread bind() bound its cores back (rank 0 is the caller's own process)."""
    if saved is not None:
        try:
            os.sched_setaffinity(saved[0], saved[1])
        except OSError:  # the thread has ended
            pass


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"))


class Channel:
    """Messages from rank 0 to every rank, each broadcast on the group: objects (pickled) and flat int64 tensors
    (words; a step's inputs, engine/step_message.py). Packed (the default), every message starts with one
    broadcast of a fixed buffer of WORDS int64 that holds its kind and length and, for words that fit, the words
    themselves: a decode step costs one collective and no pickling. Plain: a length, then the pickled bytes."""

    WORDS = 8192  # 64 KiB: a decode step of 8 sequences of up to ~1,000 tokens of context fits whole
    PICKLED, INLINE, AFTER = 0, 1, 2  # what the fixed buffer says: bytes follow, words inside, words follow

    def __init__(self, group, packed: bool = True):
        self.group, self.opts, self.packed = group, dist.BroadcastOptions(), packed
        self.opts.rootRank = 0
        self.head = torch.zeros(self.WORDS if packed else 1, dtype=torch.long)

    def broadcast(self, t: torch.Tensor):
        self.group.broadcast([t], self.opts).wait()

    def send(self, obj):
        data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        self.send_head(self.PICKLED, data.numel())
        self.broadcast(data)

    def send_words(self, words: torch.Tensor):
        """A flat int64 tensor (needs packed: the plain channel sends objects only)."""
        n = words.numel()
        if n <= self.WORDS - 2:
            self.head[2:2 + n] = words
        self.send_head(self.INLINE if n <= self.WORDS - 2 else self.AFTER, n)
        if n > self.WORDS - 2:
            self.broadcast(words.contiguous())

    def send_head(self, kind: int, n: int):
        if self.packed:
            self.head[0], self.head[1] = kind, n
        else:
            self.head[0] = n
        self.broadcast(self.head)

    def recv(self):
        """The next message: the object sent, or a words tensor (a copy of its own)."""
        self.broadcast(self.head)
        kind, n = self.head[:2].tolist() if self.packed else (self.PICKLED, int(self.head[0]))
        if kind == self.INLINE:
            return self.head[2:2 + n].clone()
        data = torch.empty(n, dtype=torch.long if kind == self.AFTER else torch.uint8)
        self.broadcast(data)
        return data if kind == self.AFTER else pickle.loads(data.numpy().tobytes())


def join(store, rank: int, size: int, expert_parallel: bool, device: torch.device,
         packed: bool = True) -> tuple[Shard, Channel]:
    """This rank's Shard (collectives: gloo, or NCCL on CUDA) and the Channel (always gloo, on CPU tensors;
    packed: Channel's one-broadcast messages, which every rank must agree on)."""
    store = dist.PrefixStore("dsinfer", store)  # a store per group: a fresh one per spawn, torchrun's per job
    control = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, FOREVER)
    comm = control
    if device.type == "cuda":
        comm = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, size)
    return Shard(rank, size, expert_parallel, comm), Channel(control, packed)


def shutdown(shard: Shard, channel: Channel):
    """Stops the groups' threads now: left to the interpreter's exit, their destructors may abort the process."""
    for group in {id(g): g for g in (shard.group, channel.group) if g is not None}.values():
        try:
            group.shutdown()
        except RuntimeError:
            pass


def client_store(port: int, size: int):
    """A worker process's connection to the store rank 0 hosts on this machine."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=datetime.timedelta(seconds=START_SECONDS))


def torchrun_local() -> tuple[int, int]:
    """(local rank, ranks on this machine) under torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["LOCAL_WORLD_SIZE"])


def torchrun_store(size: int) -> tuple[int, object]:
    """(rank, store) of this process under torchrun, which must have started `size` ranks."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(f"tensor_parallel_size is {size}, but torchrun started {world} ranks; they must be equal")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=datetime.timedelta(seconds=START_SECONDS))
    return rank, store


class Team:
    """Rank 0's view of the group: the worker processes it started (none under torchrun), the channel to all
    ranks, and what to do when one fails."""

    def __init__(self, shard: Shard, channel: Channel, processes=(), messages=None):
        self.shard, self.channel, self.processes, self.messages = shard, channel, list(processes), messages
        self.store = None
        self.bound = None  # what parallel_group.unbind needs to give rank 0's thread its cores back
        self.broken: ParallelError | None = None

    def send(self, msg):
        start = time.perf_counter()
        self.call(self.channel.send, msg)
        self.shard.comm_seconds += time.perf_counter() - start

    def send_words(self, words: torch.Tensor):
        start = time.perf_counter()
        self.call(self.channel.send_words, words)
        self.shard.comm_seconds += time.perf_counter() - start

    def call(self, fn, *args):
        """fn(*args), which the other ranks make too. Any failure shuts the group down, since the ranks can no
        longer be in step: a collective's names the rank that died."""
        if self.broken:
            raise self.broken
        try:
            return fn(*args)
        except Exception as e:
            raise self.fail(f"a tensor-parallel call failed: {type(e).__name__}: {e}") from e

    def fail(self, why: str) -> ParallelError:
        time.sleep(0.1)  # a rank that closed its sockets is about to be seen as exited
        dead = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                for r, p in enumerate(self.processes, 1) if not p.is_alive()]
        self.broken = ParallelError("; ".join(dead + [why] + self.reports()) + "\nthe other ranks were shut down")
        self.stop_processes()
        return self.broken

    def reports(self) -> list[str]:
        """The errors worker processes reported before exiting."""
        found = []
        while self.messages is not None:
            try:
                msg = self.messages.get(timeout=0.05)
            except queues.Empty:
                break
            if msg[0] == "error":
                found.append(f"rank {msg[1]} reported:\n{msg[2]}")
        return found

    def wait_for(self, what: str, deadline: float | None = None):
        """Waits for every worker process to report `what` ('hello', 'ready'); an error report, an exit or the
        deadline instead is a ParallelError, and the group is shut down."""
        pending = set(range(1, len(self.processes) + 1))
        while pending:
            try:
                msg = self.messages.get(timeout=0.2)
            except queues.Empty:
                msg = None
            if msg and msg[0] == "error":
                raise self.fail(f"rank {msg[1]} failed while starting:\n{msg[2]}")
            if msg and msg[0] == what:
                pending.discard(msg[1])
            elif any(not self.processes[r - 1].is_alive() for r in pending):
                raise self.fail(f"a worker exited before it was {what}")
            elif deadline and time.monotonic() > deadline:
                raise self.fail(f"rank(s) {sorted(pending)} did not start within {START_SECONDS} s")

    def stop_processes(self):
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()

    def close(self):
        """Tells the other ranks to stop and waits for the processes it started."""
        if not self.broken:
            try:
                self.channel.send(("stop",))
            except RuntimeError:
                pass
            for p in self.processes:
                p.join(timeout=30)
        self.stop_processes()
        if self.shard is not None and self.channel is not None:
            shutdown(self.shard, self.channel)
            self.shard.group = self.channel = self.store = None  # destroyed now, not at the interpreter's exit
        unbind(self.bound)
        self.bound = None
        self.broken = self.broken or ParallelError("the tensor-parallel group was closed")


def spawn(size: int, target, args: tuple, device: torch.device, expert_parallel: bool,
          bind_cores: bool = True, packed: bool = True) -> Team:
    """Starts ranks 1..size-1 as processes running target(rank, size, port, messages, threads, cores, *args),
    each with its share of the cores (rank 0 too): `cores`, the share a rank binds itself to, is empty without
    bind_cores. Joins them into one group."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=START_SECONDS))
    ctx, threads = mp.get_context("spawn"), cpu_share(size)
    shares = core_shares(size) if bind_cores else [[]] * size
    messages = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, size, store.port, messages, threads, shares[r], *args),
                         daemon=True, name=f"dsinfer-rank{r}") for r in range(1, size)]
    for p in procs:
        p.start()
    team = Team(None, None, procs, messages)
    team.wait_for("hello", time.monotonic() + START_SECONDS)
    team.bound = bind(shares[0])  # before join: the group's threads start bound
    torch.set_num_threads(threads)
    try:
        team.shard, team.channel = join(store, 0, size, expert_parallel, device, packed)
    except RuntimeError as e:
        raise team.fail(f"the group could not form: {e}") from e
    team.store = store  # rank 0 hosts it: it must live as long as the group
    return team
