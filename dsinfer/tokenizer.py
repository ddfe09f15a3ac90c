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
    def __init__(self, path: str | Path):
        path = Path(path)
        self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token, self.eos_token = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = cfg.get("add_bos_token", bool(self.tok.encode("", add_special_tokens=True).ids))
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        return [self.bos_token_id] + ids if add and self.bos_token_id is not None else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; pass chat_template=...")
        try:
            return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None


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
