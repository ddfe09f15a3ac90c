"""Prompts as users give them (text, {"prompt": ...}, {"prompt_token_ids": [...]}, chat conversations) turned
into token ids, beside the output processor that turns tokens back into outputs."""
from dsinfer.tokenizer import Tokenizer


def truncate_prompt(ids: list[int], params) -> list[int]:
    """The prompt's last params.truncate_prompt_tokens ids (all of them when it is None)."""
    k = params.truncate_prompt_tokens
    return list(ids) if k is None else list(ids)[-k:]


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer

    def process(self, prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of one prompt; ValueError names what is wrong with it."""
        if isinstance(prompt, str):
            return prompt, self.need_tokenizer("text prompts").encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.process(prompt["prompt"])
        raise ValueError(f"a prompt must be a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, "
                         f"got {prompt!r:.80}")

    def chat_prompt(self, conversation: list[dict], chat_template=None, add_generation_prompt=True,
                    tools: list[dict] | None = None) -> dict:
        """A conversation rendered through the chat template (tools, when given, as its `tools` variable):
        {"prompt": text, "prompt_token_ids": ids}."""
        tok = self.need_tokenizer("chat")
        extra = {"tools": tools} if tools else {}
        text = tok.apply_chat_template(conversation, add_generation_prompt, chat_template, **extra)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_bos=False)}

    def need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer, and this model directory has no tokenizer.json; "
                             "give prompts as {'prompt_token_ids': [...]}")
        return self.tokenizer
