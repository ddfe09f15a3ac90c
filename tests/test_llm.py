import subprocess
import sys

import pytest
import torch

from dsinfer import LLM, SamplingParams


def test_text_prompt_and_decoded_output(llms):
    llm = llms("v3")
    tok = llm.get_tokenizer()
    out = llm.generate("def quicksort(xs):", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.prompt == "def quicksort(xs):"
    assert out.prompt_token_ids == tok.encode("def quicksort(xs):") and out.prompt_token_ids[0] == tok.bos_token_id
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids) and out.finished


def test_stop_strings_are_cut_from_the_text(llms):
    llm = llms("v3")
    sp = dict(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("import json", SamplingParams(**sp))[0].outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    out = llm.generate("import json", SamplingParams(stop=[stop, "never appears"], **sp))[0].outputs[0]
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop


def test_sampling_params_per_prompt(llms):
    outs = llms("v3").generate(["a", "b"], [SamplingParams(max_tokens=3, ignore_eos=True),
                                            SamplingParams(max_tokens=5, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llms("v3").generate(["a", "b", "c"], [SamplingParams()] * 2)


def test_chat_uses_the_template(llms):
    llm = llms("v3")
    conv = [{"role": "user", "content": "hi"}]
    out = llm.chat(conv, SamplingParams(max_tokens=4))[0]
    text = "<bos><|user|>hi\n<|assistant|>"
    assert out.prompt == text and out.prompt_token_ids == llm.get_tokenizer().encode(text, add_bos=False)
    assert len(llm.chat([conv, conv + [{"role": "assistant", "content": "yo"}]], SamplingParams(max_tokens=2))) == 2


def test_stream_grows_to_the_final_text(llms):
    llm = llms("v3")
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    texts = [o.outputs[0].text for o in llm.stream("class Stack:", sp)]
    assert len(texts) == 10 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == llm.generate("class Stack:", sp)[0].outputs[0].text


def test_max_model_len_limits_generation(ckpts):
    llm = LLM(ckpts["v3"], max_model_len=20)
    out = llm.generate({"prompt_token_ids": [5] * 15}, SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="prompt has 20 tokens, but max_model_len is 20"):
        llm.generate({"prompt_token_ids": [5] * 20})
    with pytest.raises(ValueError, match="max_model_len must be in"):
        LLM(ckpts["v3"], max_model_len=10**9)


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": [3, 99999]}, r"prompt token id\(s\) \[99999\] are outside the vocabulary"),
    ({"prompt_token_ids": []}, "prompt is empty"),
    (42, "a prompt must be a string"),
])
def test_bad_prompts_fail_whole_batch_cleanly(llms, prompt, message):
    llm = llms("v3")
    with pytest.raises(ValueError, match=message):
        llm.generate(["fine", prompt])
    assert not llm.engine.has_unfinished()
    assert llm.generate("still works", SamplingParams(max_tokens=2))[0].finished


def test_bad_options(ckpts):
    with pytest.raises(ValueError, match="unsupported dtype 'int3'"):
        LLM(ckpts["v2"], dtype="int3")
    with pytest.raises(ValueError, match="mla_mode"):
        LLM(ckpts["v2"], mla_mode="fast")


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "dsinfer", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_cli_generate_streams_the_completion(ckpts, llms):
    r = run_cli("generate", "--model", str(ckpts["v3"]), "def f(x):", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    want = llms("v3").generate("def f(x):", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert r.stdout == want + "\n"


def test_cli_chat_takes_turns(ckpts, llms):
    """Each reply is LLM.chat's greedy answer to the conversation so far, which holds the earlier replies."""
    r = run_cli("chat", "--model", str(ckpts["v3"]), "--max-tokens", "6", stdin="hello\nagain\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    llm, sp = llms("v3"), SamplingParams(temperature=0, max_tokens=6)
    conv, replies = [], []
    for line in ("hello", "again"):
        conv.append({"role": "user", "content": line})
        replies.append(llm.chat(conv, sp)[0].outputs[0].text)
        conv.append({"role": "assistant", "content": replies[-1]})
    assert all(replies) and r.stdout == "".join(reply + "\n" for reply in replies)


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/dir", "x"], "is not a directory"),
    (["generate", "x", "--max-tokens", "0"], "max_tokens must be >= 1"),
])
def test_cli_errors_are_one_line(args, message, ckpts):
    if "--model" not in args:
        args = args + ["--model", str(ckpts["v3"])]
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_cli_bench_prints_every_figure(ckpts):
    args = ["bench", "--model", str(ckpts["v3"]), "--num-requests", "4", "--input-len", "4:20", "--output-len",
            "2:6", "--concurrency", "2", "--decode-tokens", "4", "--prefix-len", "64", "--compare", "transformers"]
    r = subprocess.run([sys.executable, "-m", "dsinfer", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for figure in ("requests/s", "output tok/s", "TTFT ms p99", "TPOT ms p50", "decode tok/s (1 stream, 4-token context)",
                   "prefix TTFT ms (warm)", "warm/cold"):
        assert figure in r.stdout
    assert "transformers" in r.stdout and "ratio" in r.stdout


def test_embed_is_the_pooled_normalised_hidden_state(llms):
    """LLM.embed: mean over positions of the final hidden states, unit length; the same as the server's."""
    llm = llms("v3")
    ids = [[5, 9, 40, 7], [3, 3, 3]]
    got = llm.embed([{"prompt_token_ids": p} for p in ids])
    from dsinfer.engine.model_runner import scratch_forward
    for vec, p in zip(got, ids):
        want = scratch_forward(llm.model, p).float().mean(0)
        torch.testing.assert_close(vec, want / want.norm(), rtol=1e-5, atol=1e-6)
        assert vec.shape == (llm.model.config.hidden_size,) and abs(float(vec.norm()) - 1) < 1e-5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.embed({"prompt_token_ids": [10 ** 6]})
