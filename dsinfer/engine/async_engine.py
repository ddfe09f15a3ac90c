"""An asyncio front for the engine (what the server uses): the engine steps in one background thread, and
each request's outputs arrive on its own asyncio queue. Leaving a stream early aborts the request."""
import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from dsinfer.outputs import RequestOutput
from dsinfer.sampling_params import SamplingParams


class QueueFull(Exception):
    """The waiting queue has no room for a request's sequences."""

    def __init__(self, waiting: int, count: int, limit: int):
        super().__init__(f"{waiting} sequences are waiting; {count} more would pass the limit of {limit}")
        self.waiting, self.count, self.limit = waiting, count, limit


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
        return self.add_requests([prompt], params, request_ids=[request_id])[0]

    def add_requests(self, prompts: list, params: SamplingParams | None = None, max_waiting: int | None = None,
                     request_ids: list | None = None) -> list[tuple[str, asyncio.Queue]]:
        """Queues one request per prompt, all or none: bad input raises ValueError, and QueueFull when more than
        max_waiting sequences would be waiting. The check and the queueing happen under one lock, so concurrent
        callers cannot all pass it. Returns (request id, output queue) per prompt."""
        params = params or SamplingParams()
        inputs = [self.engine.inputs.process(p) for p in prompts]
        rids = [rid or f"req-{next(self.ids)}" for rid in (request_ids or [None] * len(inputs))]
        loop, added = asyncio.get_running_loop(), []
        with self.lock:
            if self.stopped:
                raise RuntimeError("the engine is shut down")
            self.check_room(len(inputs) * params.n, max_waiting)
            try:
                for rid, (text, ids) in zip(rids, inputs):
                    self.engine.add_request(rid, text, ids, params)
                    added.append((rid, asyncio.Queue()))
                    self.queues[rid] = (loop, added[-1][1])
            except Exception:
                self.drop([rid for rid, _ in added])
                raise
        self.wake.set()
        return added

    def check_room(self, count: int, max_waiting: int | None):
        """Raises QueueFull if count more sequences would put more than max_waiting in the waiting queue (lock held)."""
        waiting = len(self.engine.scheduler.waiting)
        if max_waiting is not None and waiting + count > max_waiting:
            raise QueueFull(waiting, count, max_waiting)

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs (with output_kind="delta", only the new text each time)."""
        rid, queue = self.add_request(prompt, params, request_id)
        async for out in self.stream(rid, queue):
            yield out

    async def stream(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """The outputs of a request queued by add_request(s); leaving early aborts it."""
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
        """Drops the request and frees its cache blocks now (waits at most for the step in flight); a request
        that already finished or was aborted is left alone without waiting."""
        if request_id not in self.queues:
            return
        with self.lock:
            self.drop([request_id])

    def drop(self, request_ids: list[str]):
        """Aborts the requests in the engine and forgets their queues (lock held)."""
        for rid in request_ids:
            self.engine.abort(rid)
            self.queues.pop(rid, None)

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
                except Exception as exc:  # a bug must not hang its clients, nor fail the others
                    self.fail_step(exc)
                    continue
                for out in outputs:
                    self.deliver(out.request_id, out, out.finished)

    def deliver(self, rid: str, item, last: bool):
        entry = self.queues.pop(rid, None) if last else self.queues.get(rid)
        if entry:  # None: aborted by its client while this step ran
            entry[0].call_soon_threadsafe(entry[1].put_nowait, item)

    def fail_step(self, exc: Exception):
        """A step raised: the requests it was running fail with the error, and those still waiting go on (all
        fail if none was running, so that a failure before any admission cannot repeat forever)."""
        running = {s.request_id for s in self.engine.scheduler.running} or set(self.engine.requests)
        for rid in running:
            self.engine.abort(rid)
            self.deliver(rid, RuntimeError(f"the engine failed: {exc!r}"), True)

    def shutdown(self):
        with self.lock:
            self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.engine.close()  # the prefix cache's disk tier keeps what is still in memory
