"""`dsinfer serve` as a process: it starts, serves, and on SIGTERM finishes the stream in flight and exits; a bad
flag fails before the model loads; --port 0 serves on a free port and logs which."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_stream_in_flight(ckpts):
    port = free_port()
    env = dict(os.environ, DSINFER_API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-m", "dsinfer", "serve", "--model", str(ckpts["v3"]), "--port",
                             str(port), "--max-model-len", "512"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from DSINFER_API_KEY
        body = {"model": "v3", "prompt": "def f(x):", "max_tokens": 300, "ignore_eos": True, "stream": True}
        lines = []

        def read():
            with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"},
                              timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "length") == 1


def test_a_bad_port_is_one_line_before_the_model_loads():
    r = subprocess.run([sys.executable, "-m", "dsinfer", "serve", "--port", "99999"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("dsinfer serve: error: argument --port: must be in 0..65535 (0: any free port), got 99999 "
                        "(see dsinfer serve --help)\n")


def test_port_zero_serves_on_a_free_port_and_logs_it(ckpts):
    proc = subprocess.Popen([sys.executable, "-m", "dsinfer", "serve", "--model", str(ckpts["v3"]), "--port", "0",
                             "--max-model-len", "256"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = None
    try:
        for line in proc.stdout:
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:(\d+))", line)
            if found:
                break
        assert found and int(found[2]) != 0
        assert httpx.get(found[1] + "/health", timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
