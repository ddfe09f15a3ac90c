"""Speculative decoding behind the server and the command line: the same greedy tokens as the offline API without
it, acceptance in /metrics and in `dsinfer bench`, and a bad --speculative-config refused by the parser."""
import subprocess
import sys

import httpx
import openai
import pytest

from dsinfer import LLM, SamplingParams
from tests.server.conftest import LiveServer

SPEC = '{"method": "mtp", "num_speculative_tokens": 2}'


@pytest.fixture(scope="module")
def spec_server(ckpts):
    from dsinfer.engine.async_engine import AsyncLLM
    from dsinfer.server.app import ServerConfig, build_app
    llm = LLM(ckpts["v3-mtp"], max_model_len=256, speculative_config=SPEC)
    server = LiveServer(build_app(AsyncLLM(llm), ServerConfig("tiny-v3-mtp")))
    yield server
    server.stop()


def test_server_gives_the_plain_tokens_and_reports_acceptance(ckpts, llms, spec_server):
    client = openai.OpenAI(base_url=spec_server.url + "/v1", api_key="none", max_retries=0)
    prompts = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46]]
    r = client.completions.create(model="tiny-v3-mtp", prompt=prompts, max_tokens=12, temperature=0,
                                  logprobs=1, extra_body={"ignore_eos": True})
    plain = llms("v3-mtp").generate([{"prompt_token_ids": p} for p in prompts],
                                    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.outputs[0].text for o in plain]
    text = httpx.get(spec_server.url + "/metrics").text
    drafted = [line for line in text.splitlines() if line.startswith('dsinfer_spec_decode_draft_tokens_total{')]
    assert len(drafted) == 2 and float(drafted[0].split()[-1]) > 0
    for name in ("dsinfer_spec_decode_accepted_tokens_total{", 'dsinfer_spec_decode_acceptance_rate{position="2"}',
                 "dsinfer_spec_decode_verify_steps_total", "dsinfer_spec_decode_mean_accepted_length"):
        assert name in text


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dsinfer", *args], capture_output=True, text=True, timeout=300)


def test_cli_bench_reports_acceptance(ckpts):
    r = run_cli("bench", "--model", str(ckpts["v3-mtp"]), "--num-requests", "2", "--input-len", "4:20",
                "--output-len", "4:8", "--concurrency", "2", "--decode-tokens", "8", "--prefix-len", "32",
                "--speculative-config", SPEC)
    assert r.returncode == 0, r.stderr
    for figure in ("[speculative decoding]", "acceptance rate, position 1", "acceptance rate, position 2",
                   "mean accepted length", "decode tok/s (1 stream"):
        assert figure in r.stdout


@pytest.mark.parametrize("value, message", [
    ('{"method": "ngram", "num_speculative_tokens": 2}', "speculative_config.method must be one of"),
    ("{'method': 'mtp'}", "not valid JSON"),
])
def test_cli_refuses_a_bad_speculative_config(value, message, ckpts):
    r = run_cli("serve", "--model", str(ckpts["v3-mtp"]), "--speculative-config", value)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
