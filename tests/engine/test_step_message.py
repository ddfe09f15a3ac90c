"""The tensor-parallel channel and the packed step: what rank 0 sends is what the other ranks receive, through a
real gloo group of two ranks (two threads of this process), packed or plain; a step packs and unpacks to the
same inputs."""
import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from dsinfer.engine import step_message
from dsinfer.engine.parallel_group import Channel
from dsinfer.layers.attention import AttentionMetadata


def channels(packed: bool) -> list[Channel]:
    """Rank 0's and rank 1's channels on one gloo group (each rank's group is made in a thread of its own: each
    waits for the other)."""
    store, made = dist.HashStore(), [None, None]

    def make(rank):
        made[rank] = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=30))
    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [Channel(g, packed) for g in made]


def exchange(pair: list[Channel], messages: list) -> list:
    """What rank 1 receives while rank 0 sends `messages` (tensors as words, the rest as objects)."""
    got = []
    reader = threading.Thread(target=lambda: got.extend(pair[1].recv() for _ in messages))
    reader.start()
    for m in messages:
        pair[0].send_words(m) if isinstance(m, torch.Tensor) else pair[0].send(m)
    reader.join()
    return got


@pytest.mark.parametrize("packed", [True, False])
def test_objects_arrive_as_sent(packed):
    sent = [("cache", "bfloat16", 7, 16), ("write_block", 3, [torch.arange(6.0)]), ("stop",)]
    got = exchange(channels(packed), sent)
    assert got[0] == sent[0] and got[2] == sent[2]
    assert got[1][:2] == sent[1][:2] and torch.equal(got[1][2][0], sent[1][2][0])


def test_words_inside_the_fixed_buffer_and_after_it_arrive_as_sent():
    short, long = torch.arange(100) * 7 - 3, torch.arange(3 * Channel.WORDS) * 11
    got = exchange(channels(True), [short, ("forward",), long, short + 1])
    assert torch.equal(got[0], short) and got[1] == ("forward",)
    assert torch.equal(got[2], long) and torch.equal(got[3], short + 1)


def a_step(rows):
    """A step of a 3-token prefill chunk and two decodes, as ModelRunner.inputs builds it."""
    flat = torch.tensor([[5, 6, 7, 8, 9], [0, 1, 2, 40, 17], [32, 33, 34, 88, 65], [0, 0, 0, 1, 2]])
    gather = torch.arange(3 * 48).view(3, 48) * 3
    meta = AttentionMetadata(1, 3, [3, 1, 1], [3, 41, 18], flat[2], gather, flat[3])
    return flat[0], flat[1], meta, rows


@pytest.mark.parametrize("rows", [torch.tensor([0, 1, 2, 3, 4]), torch.tensor([2, 4]), None])
def test_a_step_unpacks_to_what_was_packed(rows):
    ids, positions, meta, rows = a_step(rows)
    got = step_message.unpack(step_message.pack(ids, positions, meta, rows), torch.device("cpu"))
    assert torch.equal(got[0], ids) and torch.equal(got[1], positions)
    assert (got[3] is None) if rows is None else torch.equal(got[3], rows)
    m = got[2]
    assert (m.num_prefills, m.num_prefill_tokens, m.query_lens, m.context_lens) == (1, 3, [3, 1, 1], [3, 41, 18])
    for name in ("slot_mapping", "gather_index", "token_seq"):
        assert torch.equal(getattr(m, name), getattr(meta, name)), name
