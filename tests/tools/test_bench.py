"""`dsinfer bench` (dsinfer/tools/bench): every figure, --json with the machine and settings, --plot as a PNG, the
progress bars, and no reaching into other modules' private members."""
import ast
import importlib.util
import json
import struct
from pathlib import Path

import pytest

import dsinfer
from dsinfer.cli import main
from dsinfer.tools.bench import report
from dsinfer.tools.bench.progress import Progress

TINY = ["--num-requests", "4", "--input-len", "4:20", "--output-len", "2:6", "--concurrency", "2",
        "--decode-tokens", "4", "--prefix-len", "64"]


def png_size(path) -> tuple[int, int]:
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(dsinfer.LLM, "__init__", refuse)


def test_json_and_plot_of_dsinfer_alone(ckpts, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--model", str(ckpts["v3"]), *TINY, "--json", str(out), "--plot", str(png)]) == 0
    stdout, stderr = capsys.readouterr()
    assert "TTFT ms p99" in stdout and "transformers" not in stdout
    assert stderr == ""  # stderr is not a terminal here, so no progress bars
    rec = json.loads(out.read_text())
    assert set(rec) == {"date", "versions", "machine", "settings", "results"}
    assert rec["versions"]["dsinfer"] == dsinfer.__version__ and rec["results"]["transformers"] is None
    assert rec["machine"]["cpu_model"] and isinstance(rec["machine"]["isa"], list)
    settings = rec["settings"]
    assert settings["num_requests"] == 4 and settings["input_len"] == [4, 20] and settings["dtype"] == "float32"
    assert settings["kv_cache_dtype"] == "float32" and "cpu_kernels=" in settings["kernels"]
    assert f"kernels: {settings['kernels']}" in stdout  # what was picked, beside the figures
    ours = rec["results"]["dsinfer"]
    assert list(ours) == ["throughput", "latency", "single stream", "prefix cache (64 tokens)"]
    assert ours["throughput"]["requests/s"] > 0 and ours["latency"]["TPOT ms p50"] > 0
    width, height = png_size(png)
    assert width > 600 and height > 400


def test_compare_with_transformers_json_and_plot(ckpts, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--model", str(ckpts["v3"]), *TINY, "--compare", "transformers", "--json", str(out),
            "--plot", str(png)]
    assert main(args) == 0
    assert "ratio" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    peer = rec["results"]["transformers"]
    assert set(peer) == {"throughput", "single stream", "prefix cache (64 tokens)"}
    assert set(peer["single stream"]) == set(rec["results"]["dsinfer"]["single stream"])  # same figures, same way
    assert "transformers" in rec["versions"]
    assert png_size(png)[0] > 600


def test_plot_without_matplotlib_fails_before_loading(ckpts, tmp_path, monkeypatch, capsys, no_model_load):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "--model", str(ckpts["v3"]), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and err.count("\n") == 1 and "Traceback" not in err


def test_progress_bars_name_the_phase_and_count_requests(capsys):
    progress = Progress(2, enabled=True)
    with progress.phase("dsinfer: throughput", 3) as tick:
        tick(2)
    progress.close()
    err = capsys.readouterr().err
    assert "now dsinfer: throughput" in err and "dsinfer: throughput:   0%" in err and "0/3" in err


def test_cpu_info_reads_model_and_isa_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Example CPU @ 3GHz\nflags\t\t: fpu sse4_2 avx2 avx512f "
                   "avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\nmodel name\t: Example CPU @ 3GHz\n")
    info = report.cpu_info(str(x86))
    assert info["cpu_model"] == "Example CPU @ 3GHz"
    assert info["isa"] == ["sse4_2", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp sve bf16 i8mm\n")
    assert report.cpu_info(str(arm))["isa"] == ["asimd", "asimddp", "sve", "bf16", "i8mm"]
    assert report.cpu_info(str(tmp_path / "missing"))["isa"] == []


def test_bench_uses_no_private_member_of_another_module():
    """The bench drives dsinfer through its public API (LLM.add_requests, step, has_unfinished, stream)."""
    root = Path(dsinfer.__file__).parent / "tools" / "bench"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                pytest.fail(f"{path.name}:{node.lineno} uses {node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "engine":
                pytest.fail(f"{path.name}:{node.lineno} reaches into llm.engine")


def test_decode_figures_count_tokens_not_outputs():
    """With speculative decoding one output of a stream brings several tokens: tok/s counts the tokens, and the
    median figure takes each step's time per token."""
    from dsinfer.tools.bench.measure import decode_figures
    label = "(1 stream, 8-token context)"
    one_each = decode_figures(8, [0.0, 1.0, 3.0])
    assert one_each[f"decode tok/s {label}"] == pytest.approx(2 / 3)
    assert one_each[f"decode tok/s, median gap {label}"] == pytest.approx(1 / 1.5)
    several = decode_figures(8, [0.0, 1.0, 2.0, 4.0], [1, 3, 4, 8])  # 2, 1 and 4 new tokens
    assert several[f"decode tok/s {label}"] == pytest.approx(7 / 4)
    assert several[f"decode tok/s, median gap {label}"] == pytest.approx(1 / 0.5)  # per token: 0.5, 1, 0.5
    assert decode_figures(8, [0.0]) == {}


def test_one_stream_decode_passes_each_outputs_token_count(monkeypatch):
    from types import SimpleNamespace

    from dsinfer.tools.bench import engine, measure
    seen = []
    monkeypatch.setattr(measure, "decode_figures", lambda context, stamps, counts: seen.append(counts) or {})
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(n)))]) for n in (1, 3, 4, 6)]
    llm = SimpleNamespace(stream=lambda prompt, params: iter(outputs))
    engine.decode_one_stream(llm, SimpleNamespace(contexts=[8], vocab=64, decode_tokens=6))
    assert seen == [[1, 3, 4, 6]]
