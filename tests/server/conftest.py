import socket
import threading
import time

import openai
import pytest
import uvicorn


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread, around a fresh AsyncLLM."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def make_server(ckpts):
    from dsinfer import LLM
    from dsinfer.engine.async_engine import AsyncLLM
    from dsinfer.server.app import ServerConfig, build_app
    servers = []

    def make(llm_kw=None, **cfg):
        llm = LLM(ckpts["v3"], max_model_len=256, **(llm_kw or {}))
        server = LiveServer(build_app(AsyncLLM(llm), ServerConfig("tiny-v3", **cfg)))
        server.llm = llm
        servers.append(server)
        return server
    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(make_server):
    """A module's own server on the v3 test checkpoint."""
    return make_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ref(llms):
    """An offline LLM on the same checkpoint (the server's own engine belongs to its thread)."""
    return llms("v3", max_model_len=256)
