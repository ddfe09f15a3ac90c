"""The prefix cache's second tier: blocks evicted from memory, kept as files on disk across restarts.

Each model (checkpoint files, compute dtype, cache format, block size, layers, quantization) gets its own
subdirectory named by a digest of all of them, so no other model or setting ever reads its blocks. A block's file
is named by its chained digest (sequence.block_digest) and holds a header (magic, version, the block's token ids,
each layer's dtype and shape), the rows of every layer as stored, and a blake2b checksum of all that. Files are
written by one background thread to a temporary name and renamed into place, so no reader, in this process or
another sharing the directory, sees half a file; a file that fails any check is deleted and counts as a miss.
The directory is kept under a byte limit, the least recently used files deleted first."""
import hashlib
import json
import logging
import math
import os
import queue
import struct
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("dsinfer")

MAGIC, VERSION = b"DSKVBLK\0", 1
HEAD = struct.Struct("<8sHII")  # magic, version, number of tokens, number of layers
CHECKSUM_BYTES = 16
DIGEST_BYTES = 16  # a block's name (sequence.block_digest)
SUFFIX, TMP_SUFFIX = ".kvb", ".tmp"
DEFAULT_LIMIT = 10 << 30
QUEUE_BLOCKS = 64       # blocks waiting to be written; past this, evicted blocks are dropped, not waited for
STALE_TMP_SECONDS = 3600
MAX_SAFETENSORS_HEADER = 100 << 20

Layout = list[tuple[torch.dtype, tuple[int, ...]]]  # per layer: a block's rows' dtype and shape


class BadBlockFile(ValueError):
    pass


def checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=CHECKSUM_BYTES).digest()


def cache_layout(cache) -> Layout:
    """What KVCache.read_block gives for one block: each layer's storage dtype and [block_size, row width]."""
    return [(layer.dtype, (cache.block_size, layer.shape[1])) for layer in cache.tensors]


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def encode_block(token_ids, rows: list[torch.Tensor]) -> bytes:
    """One block's file: header, every layer's rows as stored, checksum."""
    parts = [HEAD.pack(MAGIC, VERSION, len(token_ids), len(rows)), struct.pack(f"<{len(token_ids)}q", *token_ids)]
    for t in rows:
        name = str(t.dtype).encode()
        parts.append(struct.pack(f"<B{len(name)}sB{t.dim()}I", len(name), name, t.dim(), *t.shape))
    body = b"".join(parts + [raw_bytes(t) for t in rows])
    return body + checksum(body)


def decode_block(data: bytes, token_ids, layout: Layout) -> list[torch.Tensor]:
    """The rows of a block file, after checking its checksum, magic, version, token ids and each layer's dtype
    and shape against what is expected; BadBlockFile says which check failed."""
    body = data[:-CHECKSUM_BYTES]
    if len(data) < HEAD.size + CHECKSUM_BYTES or checksum(body) != data[-CHECKSUM_BYTES:]:
        raise BadBlockFile("checksum mismatch (truncated or corrupt)")
    try:
        return parse_body(bytearray(body), tuple(token_ids), layout)
    except (struct.error, UnicodeDecodeError, RuntimeError) as e:
        raise BadBlockFile(f"malformed header ({e})") from None


def parse_body(body: bytearray, token_ids: tuple, layout: Layout) -> list[torch.Tensor]:
    magic, version, num_tokens, num_layers = HEAD.unpack_from(body)
    if magic != MAGIC or version != VERSION:
        raise BadBlockFile(f"not a version-{VERSION} block file")
    offset = HEAD.size + 8 * num_tokens
    if struct.unpack_from(f"<{num_tokens}q", body, HEAD.size) != token_ids:
        raise BadBlockFile("it holds other token ids than the prompt's")
    if num_layers != len(layout):
        raise BadBlockFile(f"it has {num_layers} layers, the model {len(layout)}")
    for dtype, shape in layout:
        (n,) = struct.unpack_from("<B", body, offset)
        name, ndim = struct.unpack_from(f"<{n}sB", body, offset + 1)
        dims = struct.unpack_from(f"<{ndim}I", body, offset + 2 + n)
        if name.decode() != str(dtype) or dims != shape:
            raise BadBlockFile(f"a layer is {name.decode()} {list(dims)}, expected {dtype} {list(shape)}")
        offset += 2 + n + 4 * ndim
    return read_rows(body, offset, layout)


def read_rows(body: bytearray, offset: int, layout: Layout) -> list[torch.Tensor]:
    rows = []
    for dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        if offset + size > len(body):
            raise BadBlockFile("shorter than its header says")
        rows.append(torch.frombuffer(body, dtype=torch.uint8, count=size, offset=offset).view(dtype).view(shape))
        offset += size
    if offset != len(body):
        raise BadBlockFile("longer than its header says")
    return rows


def model_key(checkpoint: Path, settings: dict) -> str:
    """A digest of what makes a model's cache rows what they are: config.json, each safetensors file's name, size
    and header (the tensors' names, dtypes, shapes and offsets), and the settings (dtypes, block size, ...)."""
    h = hashlib.blake2b(digest_size=16)
    h.update((checkpoint / "config.json").read_bytes())
    for file in sorted(checkpoint.glob("*.safetensors")):
        h.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        h.update(safetensors_header(file))
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def safetensors_header(file: Path) -> bytes:
    """The first 8 + N bytes of a safetensors file: N, then the JSON that describes its tensors."""
    with open(file, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        return head + f.read(min(size, MAX_SAFETENSORS_HEADER))


class BlockFiles:
    """A directory of block files under a byte limit, least recently used deleted first. Thread-safe."""

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit, self.lock = directory, limit, threading.Lock()
        self.index: OrderedDict[bytes, int] = OrderedDict()  # digest -> file bytes, least recently used first
        self.total = self.evicted = 0
        self.scan()

    def path(self, digest: bytes) -> Path:
        return self.directory / (digest.hex() + SUFFIX)

    def scan(self):
        """Indexes the files already there, in order of last use (mtime); deletes temp files left by a crash."""
        found = []
        for entry in os.scandir(self.directory):
            try:
                st = entry.stat()
                if entry.name.endswith(SUFFIX) and len(entry.name) == 2 * DIGEST_BYTES + len(SUFFIX):
                    found.append((st.st_mtime, bytes.fromhex(entry.name[:-len(SUFFIX)]), st.st_size))
                elif entry.name.endswith(TMP_SUFFIX) and time.time() - st.st_mtime > STALE_TMP_SECONDS:
                    os.unlink(entry.path)
            except (OSError, ValueError):  # gone meanwhile, or not a name we wrote
                continue
        for _, digest, size in sorted(found):
            self.add(digest, size)

    def has(self, digest: bytes) -> bool:
        """In the index, or written since by another process sharing the directory."""
        with self.lock:
            if digest in self.index:
                return True
        try:
            size = os.stat(self.path(digest)).st_size
        except OSError:
            return False
        self.add(digest, size)
        return True

    def add(self, digest: bytes, size: int):
        with self.lock:
            self.total += size - self.index.pop(digest, 0)
            self.index[digest] = size
            while self.total > self.limit and self.index:
                old, old_size = self.index.popitem(last=False)
                self.total -= old_size
                self.evicted += 1
                self.path(old).unlink(missing_ok=True)

    def write(self, digest: bytes, data: bytes):
        """Writes to a temporary name in the same directory, then renames: readers see all of it or nothing."""
        tmp = self.directory / f".{digest.hex()}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path(digest))
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.add(digest, len(data))

    def read(self, digest: bytes) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except OSError:  # deleted meanwhile (by our limit or another process), or unreadable
            self.forget(digest)
            return None

    def touch(self, digest: bytes):
        with self.lock:
            if digest in self.index:
                self.index.move_to_end(digest)
        try:
            os.utime(self.path(digest))  # so that a restart seeds its LRU order with this use
        except OSError:
            pass

    def forget(self, digest: bytes):
        with self.lock:
            self.total -= self.index.pop(digest, 0)

    def discard(self, digest: bytes):
        self.forget(digest)
        self.path(digest).unlink(missing_ok=True)


class Writer:
    """The background half: blocks handed to spill wait here (still readable) until the thread writes them."""

    def __init__(self, files: BlockFiles, queue_blocks: int):
        self.files, self.queue, self.lock = files, queue.Queue(queue_blocks), threading.Lock()
        self.pending: dict[bytes, tuple[tuple, list[torch.Tensor]]] = {}  # digest -> (token ids, rows)
        self.stored = self.dropped = self.errors = 0
        self.store_seconds = 0.0
        self.stopping = threading.Event()

    def submit(self, digest: bytes, token_ids: tuple, rows: list[torch.Tensor], wait: bool):
        with self.lock:
            if digest in self.pending:
                return
            self.pending[digest] = (token_ids, rows)
        try:
            self.queue.put(digest, block=wait)
        except queue.Full:  # the disk is behind: lose this block rather than stall the step
            with self.lock:
                del self.pending[digest]
            self.dropped += 1

    def holds(self, digest: bytes) -> bool:
        with self.lock:
            return digest in self.pending

    def pending_rows(self, digest: bytes, token_ids: tuple) -> list[torch.Tensor] | None:
        with self.lock:
            entry = self.pending.get(digest)
        return entry[1] if entry is not None and entry[0] == token_ids else None

    def run(self):
        while not self.stopping.is_set():
            digest = self.queue.get()
            try:
                if digest is None:
                    return
                if not self.stopping.is_set():
                    self.write(digest)
            finally:
                self.queue.task_done()

    def write(self, digest: bytes):
        with self.lock:
            token_ids, rows = self.pending[digest]
        start = time.perf_counter()
        try:
            self.files.write(digest, encode_block(token_ids, rows))
            self.stored += 1
            self.store_seconds += time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - a block that cannot be written must not stop the writer
            self.errors += 1
            if self.errors == 1:
                log.warning("prefix-cache directory %s: cannot write a block (%s); blocks are lost until this "
                            "clears", self.files.directory, e)
        finally:
            with self.lock:
                del self.pending[digest]


@dataclass(slots=True)
class TierStats:
    blocks: int            # block files on disk (this model's subdirectory)
    bytes: int
    stored_blocks: int     # written by this process
    dropped_blocks: int    # evicted while the writer was behind, not written
    discarded_blocks: int  # files that failed a check, deleted
    evicted_blocks: int    # files deleted to stay under the limit
    store_seconds_mean: float
    load_seconds_mean: float


class DiskTier:
    """has / spill / fetch, what BlockManager asks of a second tier, over one model's directory of block files."""

    def __init__(self, directory: Path, limit: int | None, layout: Layout, queue_blocks: int = QUEUE_BLOCKS):
        self.files = BlockFiles(make_directory(Path(directory)), DEFAULT_LIMIT if limit is None else limit)
        self.layout, self.writer = layout, Writer(self.files, queue_blocks)
        self.loaded = self.discarded = 0
        self.load_seconds = 0.0
        self.thread = threading.Thread(target=self.writer.run, name="dsinfer-prefix-cache-writer", daemon=True)
        self.thread.start()
        weakref.finalize(self, stop_writer, self.writer, self.thread)  # at exit, or when the tier is collected

    @property
    def directory(self) -> Path:
        return self.files.directory

    def has(self, digest: bytes) -> bool:
        return self.writer.holds(digest) or self.files.has(digest)

    def spill(self, digest: bytes, token_ids: tuple, rows: list[torch.Tensor], wait: bool = False):
        """Queues a copy of an evicted block's rows to be written in the background; when the queue is full, the
        block is dropped (or, with wait, this waits for room)."""
        if not self.thread.is_alive():  # closed
            return
        self.writer.submit(digest, tuple(token_ids), rows, wait)

    def fetch(self, digest: bytes, token_ids) -> list[torch.Tensor] | None:
        """The block's rows if the tier holds it intact for exactly these tokens, else None (a bad file is deleted)."""
        start, token_ids = time.perf_counter(), tuple(token_ids)
        rows = self.writer.pending_rows(digest, token_ids)
        if rows is None:
            rows = self.read(digest, token_ids)
        if rows is not None:
            self.loaded += 1
            self.load_seconds += time.perf_counter() - start
        return rows

    def read(self, digest: bytes, token_ids: tuple) -> list[torch.Tensor] | None:
        data = self.files.read(digest)
        if data is None:
            return None
        try:
            rows = decode_block(data, token_ids, self.layout)
        except BadBlockFile as e:
            log.warning("prefix-cache file %s discarded: %s", self.files.path(digest), e)
            self.files.discard(digest)
            self.discarded += 1
            return None
        self.files.touch(digest)
        return rows

    def flush(self):
        """Waits until every queued block is on disk."""
        if self.thread.is_alive():
            self.writer.queue.join()

    def close(self):
        """Writes what is queued and stops the writer thread; spills after this are dropped."""
        if self.thread.is_alive():
            self.writer.queue.put(None)
            self.thread.join()

    def stats(self) -> TierStats:
        f, w = self.files, self.writer
        return TierStats(len(f.index), f.total, w.stored, w.dropped, self.discarded, f.evicted,
                         w.store_seconds / w.stored if w.stored else 0.0,
                         self.load_seconds / self.loaded if self.loaded else 0.0)


def stop_writer(writer: Writer, thread: threading.Thread, timeout: float = 10.0):
    """Ends the writer after the block it is writing; the queued ones are lost. Run at exit, so that the thread
    is not still inside torch while the interpreter shuts down (which aborts the process)."""
    writer.stopping.set()
    try:
        writer.queue.put_nowait(None)
    except queue.Full:  # the writer sees the flag once its block is written
        pass
    thread.join(timeout)


def make_directory(directory: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"prefix_cache_dir: cannot create {directory}: {e.strerror or e}") from None
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise ValueError(f"prefix_cache_dir: {directory} is not readable and writable")
    return directory
