"""dsinfer.tokenizer.Tokenizer's Hugging Face-like interface, against the `tokenizers` library directly and
against transformers' PreTrainedTokenizerFast on the built-in model's tokenizer.json."""
import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer

from dsinfer import DEFAULT_MODEL
from dsinfer.tokenizer import Tokenizer

TEXTS = ["def f(x):\n    return x + 1", "héllo wörld — ключ 🙂", "", "<bos>a<eos>b"]
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def raw():
    return RawTokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_MODEL / "tokenizer.json"), bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def ids_of(text, raw):
    return raw.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tokenizers_with_the_configured_bos(tok, raw, text):
    assert tok.encode(text, add_special_tokens=False) == ids_of(text, raw)
    assert tok.encode(text) == [tok.bos_token_id] + ids_of(text, raw)
    assert tok.encode(text, add_bos=False) == ids_of(text, raw)  # the engine's keyword still works
    assert tok.encode(text, False, add_bos=True) == [tok.bos_token_id] + ids_of(text, raw)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_and_tokens_match_transformers(tok, hf, text):
    ids = hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == ids
    with_bos = [tok.bos_token_id] + ids
    for skip in (False, True):
        assert tok.decode(with_bos, skip_special_tokens=skip) == hf.decode(with_bos, skip_special_tokens=skip)
    assert tok.convert_ids_to_tokens(with_bos) == hf.convert_ids_to_tokens(with_bos)
    assert tok.convert_ids_to_tokens(with_bos, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        with_bos, skip_special_tokens=True)
    assert tok.tokenize(text) == hf.tokenize(text)


def test_single_ids_and_tokens_match_transformers(tok, hf):
    assert tok.convert_ids_to_tokens(300) == hf.convert_ids_to_tokens(300)
    assert tok.convert_tokens_to_ids("<eos>") == hf.convert_tokens_to_ids("<eos>") == tok.eos_token_id
    tokens = hf.convert_ids_to_tokens([5, 77, 300])
    assert tok.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens) == [5, 77, 300]
    assert tok.decode(300, skip_special_tokens=False) == hf.decode(300)


def test_special_ids_and_sizes(tok, hf, raw):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                      hf.pad_token_id) == (0, 1, 2)
    assert tok.vocab_size == raw.get_vocab_size() == len(tok) == len(hf)
    assert tok.all_special_ids == sorted(hf.all_special_ids)
    assert tok.get_vocab() == hf.get_vocab()


def test_batch_decode(tok, raw):
    seqs = [tok.encode(t) for t in TEXTS]
    assert tok.batch_decode(seqs) == [raw.decode(s, skip_special_tokens=True) for s in seqs]
    assert tok.batch_decode(seqs, skip_special_tokens=False) == [tok.decode(s, False) for s in seqs]


def test_call_one_text_and_a_batch(tok):
    one = tok("def f(x):")
    assert one == {"input_ids": tok.encode("def f(x):"), "attention_mask": [1] * len(one["input_ids"])}
    batch = tok(["a b c d", "a"])
    assert batch["input_ids"] == [tok.encode("a b c d"), tok.encode("a")]
    assert [len(m) for m in batch["attention_mask"]] == [len(i) for i in batch["input_ids"]]
    assert tok("x", add_special_tokens=False)["input_ids"] == tok.encode("x", False)


def test_call_pads_to_the_longest_and_gives_tensors(tok):
    padded = tok(["a b c d", "a"], padding=True, return_tensors="pt")
    short = tok.encode("a")
    width = len(tok.encode("a b c d"))
    assert padded["input_ids"].shape == padded["attention_mask"].shape == (2, width)
    assert padded["input_ids"][1].tolist() == short + [tok.pad_token_id] * (width - len(short))
    assert padded["attention_mask"][1].tolist() == [1] * len(short) + [0] * (width - len(short))
    assert torch.equal(tok("a", return_tensors="pt")["input_ids"], torch.tensor([short]))


def test_apply_chat_template_text_and_ids(tok, hf):
    text = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert text == "<bos># system:\nbe brief\n# user:\nhi\n# assistant:\n"
    assert tok.apply_chat_template(CONV, add_generation_prompt=False).endswith("hi\n")
    ids = tok.apply_chat_template(CONV, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False) and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False) == text
    hf.chat_template = tok.chat_template
    ref = hf.apply_chat_template(CONV, tokenize=True, add_generation_prompt=True)
    assert ids == (ref["input_ids"] if hasattr(ref, "keys") else ref)


def test_apply_chat_template_keeps_the_positional_form_and_batches(tok):
    assert tok.apply_chat_template(CONV, True, None) == tok.apply_chat_template(CONV)
    own = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ extra }}"
    assert tok.apply_chat_template(CONV, False, own, extra="!") == "[be brief][hi]!"
    assert tok.apply_chat_template([CONV, CONV[1:]]) == [tok.apply_chat_template(CONV),
                                                         tok.apply_chat_template(CONV[1:])]


def test_padding_without_a_pad_token_says_so(tok):
    bare = Tokenizer.__new__(Tokenizer)
    bare.__dict__.update(tok.__dict__, pad_token=None)
    with pytest.raises(ValueError, match="pad token"):
        bare(["a", "a b"], padding=True)
