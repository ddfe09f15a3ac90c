"""Token embedding lookup, from a table in memory or straight from the checkpoint file."""
import os

import torch
import torch.nn.functional as F


class FileRows:
    """A [rows, cols] table left in its file: a lookup reads the rows it needs with pread, so nothing of the
    table is mapped into the process or stays resident in it (the OS page cache keeps the rows in use).
    A memory map would not do: every page fault maps 64 KiB around it (fault-around), 16 rows of V2's table
    for each token looked up."""

    def __init__(self, file: str | os.PathLike, offset: int, shape: tuple[int, int], dtype: torch.dtype):
        self.file, self.offset, self.shape, self.dtype = str(file), offset, tuple(shape), dtype
        self.row_bytes = shape[1] * torch.empty((), dtype=dtype).element_size()
        self.fd = os.open(self.file, os.O_RDONLY)
        end = offset + shape[0] * self.row_bytes
        if os.fstat(self.fd).st_size < end:
            os.close(self.fd)
            self.fd = None  # closed: __del__ must not close the number again (another file may hold it by then)
            raise ValueError(f"{self.file} ends before the table's {end} bytes")

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """table[ids] for ids of any shape -> [*ids.shape, cols], in the table's dtype."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        if len(unique) and not 0 <= int(unique[0]) <= int(unique[-1]) < self.shape[0]:
            raise IndexError(f"token id out of range 0..{self.shape[0] - 1}")
        out = torch.empty(len(unique), self.shape[1], dtype=self.dtype)
        raw = out.view(torch.uint8).numpy()
        for i, r in enumerate(unique.tolist()):
            if os.preadv(self.fd, [raw[i]], self.offset + r * self.row_bytes) != self.row_bytes:
                raise OSError(f"short read of row {r} from {self.file}")
        return out.index_select(0, inverse).view(*ids.shape, self.shape[1])

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


def embed(ids: torch.Tensor, table: torch.Tensor | FileRows) -> torch.Tensor:
    if isinstance(table, FileRows):
        return table.rows(ids.cpu()).to(ids.device)
    return F.embedding(ids, table)
