"""An asyncio front for the engine (what the server uses): the engine steps in one background thread, and
each request's outputs arrive on its own asyncio queue. Leaving a stream early aborts the request."""
import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from dsinfer.outputs import RequestOutput
from dsinfer.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, llm):
        self.llm, self.engine = llm, llm.engine
        self.lock, self.wake, self.stopped = threading.Lock(), threading.Event(), False
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self.run_engine, name="dsinfer-engine", daemon=True)
        self.thread.start()

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> tuple[str, asyncio.Queue]:
        """Queues a request (bad input raises ValueError here, before anything is queued) and returns its id
        and the queue its outputs will arrive on. Must be called from a running event loop."""
        text, ids = self.engine.inputs.process(prompt)
        rid = request_id or f"req-{next(self.ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            if self.stopped:
                raise RuntimeError("the engine is shut down")
            self.engine.add_request(rid, text, ids, params or SamplingParams())
            self.queues[rid] = (asyncio.get_running_loop(), queue)
        self.wake.set()
        return rid, queue

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs (with output_kind="delta", only the new text each time)."""
        rid, queue = self.add_request(prompt, params, request_id)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str):
        """Drops the request and frees its cache blocks now (waits at most for the step in flight)."""
        with self.lock:
            self.engine.abort(request_id)
            self.queues.pop(request_id, None)

    def embed(self, ids: list[int]):
        """The prompt's embedding from the model itself (for the server's semantic cache)."""
        from dsinfer.engine.model_runner import embed
        with self.lock:
            return embed(self.engine.model, ids)

    def stats(self):
        with self.lock:
            return self.engine.stats()

    @property
    def num_requests(self) -> int:
        return len(self.queues)

    def run_engine(self):
        while not self.stopped:
            self.wake.wait()
            with self.lock:
                if not self.engine.has_unfinished():
                    self.wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a bug must not hang every client: fail the requests in flight
                    self.fail_all(exc)
                    continue
                for out in outputs:
                    self.deliver(out.request_id, out, out.finished)

    def deliver(self, rid: str, item, last: bool):
        entry = self.queues.pop(rid, None) if last else self.queues.get(rid)
        if entry:  # None: aborted by its client while this step ran
            entry[0].call_soon_threadsafe(entry[1].put_nowait, item)

    def fail_all(self, exc: Exception):
        for rid in list(self.queues):
            self.engine.abort(rid)
            self.deliver(rid, RuntimeError(f"the engine failed: {exc!r}"), True)

    def shutdown(self):
        with self.lock:
            self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.engine.close()  # the prefix cache's disk tier keeps what is still in memory
