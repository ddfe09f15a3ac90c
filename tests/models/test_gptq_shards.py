"""A rank's part of a GPTQ checkpoint read slice by slice (models/sharded_load.read_gptq_part): the same codes,
scales and zero points as the whole layer read and then cut (sharded_load.gptq_part), with about 1/N of the
packed weights read."""
import pytest
import torch

from dsinfer.layers.parallel import Shard
from dsinfer.models import build_model, loader, quant_plan
from dsinfer.models.loader import ShardReader, read_config
from dsinfer.models.sharded_load import gptq_part
from dsinfer.quant import gptq_format
from tests.quant.test_gptq_checkpoint import write_gptq


def whole_then_cut(read, shape, qc, n, k, shard, name):
    return gptq_part({s: read(s) for s in gptq_format.SUFFIXES if shape(s) is not None}, qc, n, k, shard, name)


def load_rank(path, rank: int, expert_parallel: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """(the rank's weight tensors, bytes of qweight read)."""
    read, get = [0], ShardReader.get

    def counting(self, file, name, index=None):
        t = get(self, file, name, index)
        read[0] += t.numel() * t.element_size() if name.endswith(".qweight") else 0
        return t
    monkeypatch.setattr(ShardReader, "get", counting)
    model = build_model(read_config(path), torch.float32, torch.device("cpu"), shard=Shard(rank, 2, expert_parallel))
    quant_plan.prepare(model, path, None, None, True)
    loader.load_weights(model, path)
    return list(quant_plan.weight_tensors(model)), read[0]


@pytest.mark.parametrize("bits,group,expert_parallel", [(4, 16, False), (8, 16, True), (4, 128, False)])
def test_a_rank_reads_only_its_gptq_slices(ckpts, tmp_path, monkeypatch, bits, group, expert_parallel):
    write_gptq(ckpts["v3"], tmp_path / "gptq", tmp_path / "ref", bits, group, desc_act=False)
    for rank in (0, 1):
        sliced, sliced_bytes = load_rank(tmp_path / "gptq", rank, expert_parallel, monkeypatch)
        monkeypatch.setattr(loader, "read_gptq_part", whole_then_cut)
        whole, whole_bytes = load_rank(tmp_path / "gptq", rank, expert_parallel, monkeypatch)
        monkeypatch.undo()
        assert len(sliced) == len(whole) and all(torch.equal(a, b) for a, b in zip(sliced, whole))
        assert sliced_bytes < whole_bytes if expert_parallel else sliced_bytes <= 0.6 * whole_bytes  # EP: experts whole
