"""Tokenizer from tokenizer.json (the `tokenizers` library) and chat templates from tokenizer_config.json."""
import functools
import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _raise(message):
    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(template)


class Tokenizer:
    """tokenizer.json plus tokenizer_config.json, with the parts of a Hugging Face tokenizer's interface that
    users pass around (calling it, encode / decode, token <-> id, apply_chat_template)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token, self.eos_token = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.add_bos = cfg.get("add_bos_token", bool(self.tok.encode("", add_special_tokens=True).ids))
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)

    @property
    def bos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.tok.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.tok.get_vocab(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; the BOS token leads when add_special_tokens and the model's configuration say so
        (add_bos, when given, decides instead)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        add = (add_special_tokens and self.add_bos) if add_bos is None else add_bos
        return [self.bos_token_id] + ids if add and self.bos_token_id is not None else ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, padding: bool | str = False,
                 return_tensors: str | None = None, **_ignored) -> dict:
        """{"input_ids", "attention_mask"} for one text, or lists of them for a list of texts (padding=True or
        "longest" pads on the right with the pad token; return_tensors="pt" gives torch tensors)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return _tensors({"input_ids": ids, "attention_mask": [1] * len(ids)}, return_tensors, batched=False)
        rows = [self.encode(t, add_special_tokens) for t in text]
        return _tensors(self.padded(rows) if padding not in (False, "do_not_pad") else
                        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}, return_tensors)

    def padded(self, rows: list[list[int]]) -> dict:
        if self.pad_token_id is None:
            raise ValueError("padding needs a pad token, and this tokenizer has none")
        width = max((len(r) for r in rows), default=0)
        return {"input_ids": [r + [self.pad_token_id] * (width - len(r)) for r in rows],
                "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in rows]}

    def tokenize(self, text: str) -> list[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of the ids (an int or a list). Special tokens are skipped unless asked for, as in the engine's
        SamplingParams (Hugging Face's default is to keep them: pass skip_special_tokens=False for that)."""
        return self.tok.decode([ids] if isinstance(ids, int) else list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return self.tok.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """The token string of an id, or a list of them for a list of ids (None for an id outside the vocab)."""
        if isinstance(ids, int):
            return self.tok.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.tok.id_to_token(i) for i in ids if i not in special]

    def convert_tokens_to_ids(self, tokens):
        """The id of a token string, or a list of them for a list of tokens (None for an unknown token)."""
        if isinstance(tokens, str):
            return self.tok.token_to_id(tokens)
        return [self.tok.token_to_id(t) for t in tokens]

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            chat_template: str | None = None, *, tokenize: bool = False, **template_vars):
        """The conversation rendered through the chat template: text, or token ids with tokenize=True (the
        template writes its own BOS). A list of conversations gives a list of results."""
        if messages and isinstance(messages[0], (list, tuple)):
            return [self.apply_chat_template(m, add_generation_prompt, chat_template, tokenize=tokenize,
                                             **template_vars) for m in messages]
        text = self.render_chat(messages, add_generation_prompt, chat_template, template_vars)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, chat_template: str | None,
                    template_vars: dict) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; pass chat_template=...")
        for name in ("tokenize", "return_dict", "return_tensors", "add_special_tokens", "padding", "truncation"):
            template_vars.pop(name, None)  # Hugging Face's call options, not template variables
        try:
            return _compile(template).render(**{**template_vars, "messages": messages,
                                                "add_generation_prompt": add_generation_prompt,
                                                "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""})
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None


def _tensors(enc: dict, return_tensors: str | None, batched: bool = True) -> dict:
    if return_tensors is None:
        return enc
    if return_tensors != "pt":
        raise ValueError(f"return_tensors={return_tensors!r} is not supported (only 'pt')")
    import torch
    return {k: torch.tensor(v if batched else [v]) for k, v in enc.items()}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes of an unfinished character."""
    __slots__ = ("tokenizer", "skip_special", "prefix_offset", "read_offset")

    def __init__(self, tokenizer: Tokenizer, prompt_len: int, skip_special: bool):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.prefix_offset, self.read_offset = max(prompt_len - 5, 0), prompt_len

    def step(self, ids: list[int]) -> str:
        dec = self.tokenizer.decode
        prefix = dec(ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = dec(ids[self.prefix_offset:], self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return full[len(prefix):]
