"""`dsinfer serve` as a process: it starts, serves, and on SIGTERM finishes the stream in flight and exits."""
import json
import os
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
