import pytest
import torch

from tests.checkpoints import build_all


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="session")
def llms(ckpts):
    """One fp32 LLM per checkpoint, shared by the tests that only read from it."""
    from dsinfer import LLM
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(ckpts[name], **kw)
        return cache[key]
    return get


def random_prompts(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
