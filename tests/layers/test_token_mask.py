"""dsinfer's token-mask C kernels (structured outputs' bitmasks: applied to the logits, and each row's best
allowed token) against the torch paths they mirror (dsinfer.engine.sampler.mask_rows,
dsinfer.engine.grammar.best_allowed), and their argument checks."""
import pytest
import torch

from dsinfer import kernels
from dsinfer.engine.grammar import best_allowed
from dsinfer.engine.sampler import mask_rows

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")


def random_bitmask(rows: int, words: int, g: torch.Generator) -> torch.Tensor:
    """Random words, plus all-set and all-clear ones (a JSON string's and a closing bracket's masks)."""
    mask = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=g, dtype=torch.int64).to(torch.int32)
    mask[:, ::3] = -1
    mask[:, 1::5] = 0
    return mask


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 70, 4096, 4101])
@pytest.mark.parametrize("rows", [[0], [2], [0, 1, 2], [3, 1], []])
def test_token_mask_equals_torch(vocab, rows):
    g = torch.Generator().manual_seed(vocab * 7 + len(rows))
    logits = torch.randn(4, vocab, generator=g)
    bitmask = random_bitmask(len(rows), (vocab + 31) // 32 + 1, g)  # a spare word past the vocabulary
    expected = mask_rows(logits.clone(), rows, bitmask[:, :(vocab + 31) // 32])
    assert torch.equal(kernels.token_mask(logits.clone(), rows, bitmask), expected)


@pytest.mark.parametrize("vocab", [1, 31, 33, 70, 4096, 4101])
@pytest.mark.parametrize("rows", [[0], [2], [0, 1, 2], [3, 1, 3]])
def test_token_argmax_equals_torch(vocab, rows):
    """Ties (scores rounded to a few values) go to the first allowed token, as torch's argmax; a row whose mask
    allows nothing gives 0."""
    g = torch.Generator().manual_seed(vocab * 5 + len(rows))
    scores = (torch.rand(4, vocab, generator=g) * 4).round()
    bitmask = random_bitmask(len(rows), (vocab + 31) // 32, g)
    bitmask[-1] = 0 if len(rows) == 3 else bitmask[-1]
    assert kernels.token_argmax(scores, rows, bitmask) == best_allowed(scores, rows, bitmask)


def test_token_mask_on_rows_of_a_wider_tensor():
    """Rows with a stride past the vocabulary (a view of a padded buffer) are masked in place, the rest kept."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(3, 100, generator=g)
    bitmask = random_bitmask(2, 3, g)
    expected = wide.clone()
    mask_rows(expected[:, :70], [0, 2], bitmask)
    kernels.token_mask(wide[:, :70], [0, 2], bitmask)
    assert torch.equal(wide, expected)


@pytest.mark.parametrize("logits,rows,bitmask,message", [
    (torch.zeros(2, 64, dtype=torch.float64), [0], torch.zeros(1, 2, dtype=torch.int32), "fp32"),
    (torch.zeros(64, 2).T, [0], torch.zeros(1, 2, dtype=torch.int32), "unit-stride"),
    (torch.zeros(2, 64), [0], torch.zeros(1, 1, dtype=torch.int32), "bitmask must be int32"),
    (torch.zeros(2, 64), [0, 1], torch.zeros(1, 2, dtype=torch.int32), "bitmask must be int32"),
    (torch.zeros(2, 64), [0], torch.zeros(1, 2, dtype=torch.int64), "bitmask must be int32"),
    (torch.zeros(2, 64), [2], torch.zeros(1, 2, dtype=torch.int32), "rows"),
    (torch.zeros(2, 64), [-1], torch.zeros(1, 2, dtype=torch.int32), "rows"),
])
@pytest.mark.parametrize("kernel", ["token_mask", "token_argmax"])
def test_token_mask_names_what_does_not_fit(logits, rows, bitmask, message, kernel):
    with pytest.raises(ValueError, match=message):
        getattr(kernels, kernel)(logits, rows, bitmask)


@pytest.mark.parametrize("vocab", [1, 31, 33, 70, 4096, 4101])
def test_row_argmax_equals_torch(vocab):
    """RowArgmax (a row's mask in its buffer, one C call on the row's address) gives token_argmax's torch
    reference on each row of a batch, ties and an empty mask included."""
    g = torch.Generator().manual_seed(vocab)
    scores = (torch.rand(3, vocab, generator=g) * 4).round()
    bitmask = random_bitmask(3, (vocab + 31) // 32, g)
    bitmask[2] = 0
    row_argmax = kernels.RowArgmax(vocab)
    assert row_argmax.fits(scores)
    for i in range(3):
        row_argmax.mask.copy_(bitmask[i])
        got = row_argmax(scores.data_ptr() + 4 * i * scores.stride(0))
        assert got == best_allowed(scores, [i], bitmask[i:i + 1])[0]


@pytest.mark.parametrize("scores", [torch.zeros(2, 64, dtype=torch.float64), torch.zeros(64, 2).T,
                                    torch.zeros(2, 65), torch.zeros(64)])
def test_row_argmax_refuses_scores_it_cannot_read(scores):
    assert not kernels.RowArgmax(64).fits(scores)
