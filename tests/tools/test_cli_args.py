"""Bad command-line input fails before any model loads: one line on stderr naming the flag, exit status 2, no
traceback."""
import pytest

import dsinfer
from dsinfer.cli import main, parser


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(dsinfer.LLM, "__init__", refuse)


@pytest.mark.parametrize("args, message", [
    (["serve", "--port", "99999"], "argument --port: must be in 0..65535 (0: any free port), got 99999"),
    (["serve", "--port", "-1"], "argument --port: must be in 0..65535"),
    (["serve", "--port", "http"], "argument --port: invalid int value: 'http'"),
    (["serve", "--max-num-seqs", "0"], "argument --max-num-seqs: must be >= 1, got 0"),
    (["serve", "--max-waiting", "0"], "argument --max-waiting: must be >= 1"),
    (["serve", "--response-cache-size", "-1"], "argument --response-cache-size: must be >= 0"),
    (["serve", "--semantic-cache-threshold", "1.5"], "argument --semantic-cache-threshold: must be in (0, 1]"),
    (["serve", "--model", "/no/such/dir"], "argument --model: model path '/no/such/dir' is not a directory"),
    (["serve", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    (["bench", "--num-requests", "0"], "argument --num-requests: must be >= 1, got 0"),
    (["bench", "--concurrency", "-2"], "argument --concurrency: must be >= 1, got -2"),
    (["bench", "--decode-tokens", "1"], "argument --decode-tokens: must be >= 2, got 1"),
    (["bench", "--max-model-len", "0"], "argument --max-model-len: must be >= 2, got 0"),
    (["bench", "--input-len", "9:3"], "argument --input-len: expected LO:HI with 1 <= LO <= HI"),
    (["bench", "--threads", "0"], "argument --threads: must be >= 1"),
    (["bench", "--json", "/no/such/dir/out.json"], "argument --json: directory '/no/such/dir' does not exist"),
    (["bench", "--plot", "/no/such/dir/out.png"], "argument --plot: directory '/no/such/dir' does not exist"),
    (["generate", "x", "--max-tokens", "0"], "max_tokens must be >= 1, got 0"),
    (["generate", "x", "--temperature", "-0.5"], "temperature must be >= 0, got -0.5"),
    (["generate", "x", "--top-p", "0"], "top_p must be in (0, 1], got 0"),
    (["chat", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["chat", "--temperature", "nan"], "temperature must be a number, got nan"),
    (["chat", "--model", "/no/such/dir"], "'/no/such/dir' is not a directory"),
    (["generate", "--max-model-len", "-4", "x"], "argument --max-model-len: must be >= 2, got -4"),
])
def test_bad_input_is_one_line_before_loading(args, message, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert message in err and err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_a_model_directory_without_config_is_named(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path)]) == 2
    assert f"argument --model: {tmp_path} has no config.json" in capsys.readouterr().err


def test_missing_command_and_unknown_flag_are_one_line(capsys):
    for args in ([], ["serve", "--prot", "8000"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "see dsinfer" in err


def test_good_values_pass(ckpts):
    args = parser().parse_args(["serve", "--model", str(ckpts["v3"]), "--port", "0", "--semantic-cache-threshold",
                                "1", "--response-cache-size", "0"])
    assert (args.port, args.semantic_cache_threshold, args.response_cache_size) == (0, 1.0, 0)
    args = parser().parse_args(["bench", "--json", "out.json", "--no-progress", "--dtype", "bf16"])
    assert (args.json, args.progress, args.dtype) == ("out.json", False, "bf16")
    assert parser().parse_args(["bench"]).progress is None  # auto: bars when stderr is a terminal


def test_help_exits_zero(capsys):
    assert main(["bench", "--help"]) == 0
    assert "--no-progress" in capsys.readouterr().out
