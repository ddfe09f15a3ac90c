"""Embedding rows read from the checkpoint file (FileRows) against the table itself."""
import pytest
import torch
from safetensors.torch import save_file

from dsinfer.layers.embedding import FileRows, embed
from dsinfer.models.loader import CheckpointError, file_rows


@pytest.fixture
def table(tmp_path):
    t = torch.randn(50, 12).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": t, "other": torch.zeros(3)}, tmp_path / "model.safetensors")
    return t, tmp_path


def test_rows_read_from_the_file_equal_the_table(table):
    t, path = table
    rows = file_rows(path, "model.embed_tokens.weight")
    assert rows.shape == (50, 12) and rows.dtype == torch.bfloat16
    ids = torch.tensor([[3, 49, 3], [0, 7, 12]])  # repeats, both ends of the table, 2-D
    assert torch.equal(embed(ids, rows), t[ids])
    assert embed(torch.tensor([], dtype=torch.long), rows).shape == (0, 12)


def test_out_of_range_ids_and_short_files_are_named(table, tmp_path):
    t, path = table
    rows = file_rows(path, "model.embed_tokens.weight")
    with pytest.raises(IndexError, match="out of range 0..49"):
        rows.rows(torch.tensor([50]))
    with pytest.raises(ValueError, match="ends before"):
        FileRows(path / "model.safetensors", 0, (10 ** 6, 12), torch.bfloat16)
    with pytest.raises(CheckpointError, match="only 2-D"):
        file_rows(path, "other")
