"""The corpus: the running interpreter's standard-library .py files, and optionally those of the packages installed
beside it (site-packages: everything pip installed from the registry), tests excluded, split by file."""
import functools
import sysconfig
import zlib
from pathlib import Path

import torch

SPECIALS = ["<bos>", "<eos>", "<pad>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}# {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}# assistant:\n{% endif %}")


CORPORA = ("stdlib", "packages", "both")


@functools.cache
def roots() -> dict[str, Path]:
    paths = sysconfig.get_paths()
    return {"stdlib": Path(paths["stdlib"]), "packages": Path(paths["purelib"])}


def python_files(root: Path) -> list[Path]:
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))


def stdlib_files() -> list[Path]:
    return python_files(roots()["stdlib"])


def files(kind: str) -> list[Path]:
    """The corpus `kind` (CORPORA): the standard library, the installed packages, or both."""
    if kind not in CORPORA:
        raise ValueError(f"unknown corpus {kind!r}; use one of {', '.join(CORPORA)}")
    return sorted({f for name, root in roots().items() if kind in (name, "both") for f in python_files(root)})


def is_validation(path: Path, every: int = 20) -> bool:
    """A stable split: a file is held out when the hash of its path relative to its corpus root (the innermost
    that holds it) falls in 1/every."""
    root = max((r for r in roots().values() if path.is_relative_to(r)), key=lambda r: len(r.parts))
    return zlib.crc32(path.relative_to(root).as_posix().encode()) % every == 0


def split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    return [f for f in files if not is_validation(f)], [f for f in files if is_validation(f)]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    """Byte-level BPE over the training files, saved with its tokenizer_config.json and chat template."""
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read(f) for f in files), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
         "pad_token": "<pad>", "add_bos_token": True, "model_max_length": 1024, "chat_template": CHAT_TEMPLATE},
        indent=2))
    return tok


def encode(tok, files: list[Path]) -> torch.Tensor:
    """One stream of token ids: <bos> file <eos> for every file, in order."""
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    ids = []
    for enc in tok.encode_batch([read(f) for f in files]):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.long)
