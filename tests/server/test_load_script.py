import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "load.py"


def test_load_script_reports_rates_and_percentiles(make_server):
    server = make_server()
    r = subprocess.run([sys.executable, str(SCRIPT), "--url", server.url, "--model", "tiny-v3", "--requests", "6",
                        "--concurrency", "3", "--max-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("requests/s", "TTFT p99 ms", "latency p50 ms"):
        assert name in r.stdout
    assert r.stdout.split()[:2] == ["requests", "6"] and "output tok/s" in r.stdout


def test_load_script_refuses_remote_targets():
    r = subprocess.run([sys.executable, str(SCRIPT), "--url", "http://example.com"], capture_output=True, text=True)
    assert r.returncode != 0 and "loopback" in r.stderr
