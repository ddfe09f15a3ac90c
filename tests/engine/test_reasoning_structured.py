"""Structured outputs after reasoning (reasoning_parser="deepseek_r1"): the reasoning is free text, the grammar
starts after </think>, found as a token id where the tokenizer has one, else in the text. The test models never
write </think> themselves: tests/engine/scripted.py forces the reasoning and the marker, and then keeps pushing
text the grammar refuses (a grammar that had started too early, or not at all, would let it through)."""
import json
import shutil

import jsonschema
import pytest

from dsinfer import LLM, SamplingParams, StructuredOutputsParams
from dsinfer.engine.reasoning_end import END, START, ReasoningEnd
from tests.checkpoints import write_tokenizer
from tests.engine.scripted import Script
from tests.engine.test_structured_outputs import PERSON

THOUGHT = "Bob is 30, so I say so."  # free text: the JSON grammar refuses its first character
AFTER = "\n\nSo the answer: yes"  # pushed after the marker; the grammar must refuse it


@pytest.fixture(scope="module")
def marker_ckpt(ckpts, tmp_path_factory):
    """The v3 checkpoint with a tokenizer of 510 BPE ids plus <think> and </think> as single tokens."""
    from tokenizers import AddedToken, Tokenizer
    out = tmp_path_factory.mktemp("think")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpts["v3"] / name, out / name)
    write_tokenizer(out, vocab_size=510)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([AddedToken(START, special=False), AddedToken(END, special=False)])
    tok.save(str(out / "tokenizer.json"))
    return out


def script_tokens(llm, *texts) -> list[int]:
    tok = llm.get_tokenizer()
    end = tok.convert_tokens_to_ids(END)
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    marker = [end] if end is not None else tok.encode(END, add_special_tokens=False)
    return ids[0] + marker + ids[1]


def split(text: str) -> tuple[str, str]:
    reasoning, end, content = text.partition(END)
    assert end, text
    return reasoning, content


def params(n=2, temperature=0.8):
    return SamplingParams(n=n, temperature=temperature, seed=5, max_tokens=160,
                          structured_outputs=StructuredOutputsParams(json=PERSON))


@pytest.mark.parametrize("check_first", [True, False])
@pytest.mark.parametrize("by_token", [True, False], ids=["token-id", "text"])
def test_grammar_starts_after_the_reasoning(ckpts, marker_ckpt, monkeypatch, by_token, check_first):
    llm = LLM(marker_ckpt if by_token else ckpts["v3"], max_model_len=256, reasoning_parser="deepseek_r1",
              grammar_check_first=check_first)
    assert (llm.engine.reasoning_end.end_id is not None) == by_token
    Script(monkeypatch, llm.engine, script_tokens(llm, THOUGHT, AFTER))
    sp = [params(), params(n=1, temperature=0)]
    for c in (c for out in llm.generate(["Bob is", "x = 1"], sp, use_tqdm=False) for c in out.outputs):
        reasoning, content = split(c.text)
        assert reasoning == THOUGHT and c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(content), PERSON)


def test_without_a_parser_the_grammar_holds_from_the_start(ckpts, monkeypatch):
    """The control: the same script, no reasoning parser; the grammar refuses the reasoning itself."""
    llm = LLM(ckpts["v3"], max_model_len=256)
    Script(monkeypatch, llm.engine, script_tokens(llm, THOUGHT, AFTER))
    c = llm.generate(["Bob is"], params(n=1), use_tqdm=False)[0].outputs[0]
    assert END not in c.text
    jsonschema.validate(json.loads(c.text), PERSON)


def test_a_prompt_that_closed_the_reasoning_starts_constrained(llms):
    llm = llms("v3", max_model_len=256, reasoning_parser="deepseek_r1")
    outs = llm.generate([f"{START}hm{END}", f"{END}x{START}"], params(n=1, temperature=0), use_tqdm=False)
    jsonschema.validate(json.loads(outs[0].outputs[0].text), PERSON)  # constrained from its first token
    assert not outs[1].outputs[0].text.startswith("{")  # still reasoning: free text


def test_speculative_steps_stop_at_the_marker(ckpts, monkeypatch):
    """Drafts past </think> were chosen without the grammar: the step keeps the tokens up to the marker, and the
    grammar chooses the next. The same tokens as without speculation."""
    outs = {}
    for spec in (None, {"method": "mtp", "num_speculative_tokens": 3}):
        llm = LLM(ckpts["v3-mtp"], max_model_len=256, reasoning_parser="deepseek_r1", speculative_config=spec,
                  spec_greedy_fast_path=False)
        Script(monkeypatch, llm.engine, script_tokens(llm, THOUGHT, AFTER))
        outs[spec is None] = llm.generate(["Bob is", "x"], params(n=1, temperature=0), use_tqdm=False)
        if spec:
            assert sum(llm.engine.spec.stats.accepted) >= 3 * len(THOUGHT) // 4  # the script's drafts
        monkeypatch.undo()
    for plain, spec in zip(outs[True], outs[False]):
        assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
        jsonschema.validate(json.loads(split(spec.outputs[0].text)[1]), PERSON)


def test_end_found_by_id_or_in_text(ckpts, marker_ckpt):
    by_id = ReasoningEnd(LLM(marker_ckpt, max_model_len=64).get_tokenizer())
    by_text = ReasoningEnd(LLM(ckpts["v3"], max_model_len=64).get_tokenizer())
    assert by_id.end_id is not None and by_text.end_id is None
    for end in (by_id, by_text):
        tok = end.tokenizer
        for text, closed in ((f"a{START}b", False), (f"a{START}b{END}c", True), ("plain", False),
                             (f"{END}x{START}y", False)):
            assert end.ended_in_prompt(tok.encode(text)) == closed, text


def test_an_unknown_reasoning_parser_is_a_clear_error():
    from dsinfer.engine.config import EngineConfig
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        EngineConfig.from_kwargs(reasoning_parser="qwen3")
