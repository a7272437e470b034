"""Sharded record storage: a few large files instead of one file per image.

DVC hashes, pushes and pulls every file of an output directory separately, so 100k small files
make `dvc status`/`push`/`pull` crawl (BENCHMARKS.md, DVC at full scale). A dataset directory here holds

    index.json          {"format": "fcn-shards/1", "shards": [...], "records": [...]}
    shard-00000.bin     concatenated blobs of up to `shard_size` records
    shard-00001.bin     ...

Each record has a `key`, a dict of named blobs (`[offset, length]` into its shard, e.g. the
JPEG bytes of an image and the PNG bytes of its label map) and a small JSON `meta` dict.
Reading is random access through `os.pread` on a file descriptor opened lazily per process,
so DataLoader workers and DDP ranks share nothing and nothing is loaded whole into RAM.
The writer is deterministic: identical records in identical order give identical bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir

FORMAT = "fcn-shards/1"
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class Record:
    key: str
    blobs: dict[str, bytes]
    meta: dict[str, Any]


class ShardWriter:
    """Write records into `out_dir` atomically: the directory appears only on `close()`.

    Use as a context manager; an exception inside the block discards everything written.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 1000) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self._ctx = atomic_dir(self.out_dir)
        self._tmp = self._ctx.__enter__()
        self._records: list[dict[str, Any]] = []
        self._shards: list[str] = []
        self._fh = None
        self._offset = 0
        self._keys: set[str] = set()

    def _open_next_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"shard-{len(self._shards):05d}.bin"
        self._shards.append(name)
        self._fh = open(self._tmp / name, "wb")  # noqa: SIM115 - closed by the next shard/close()
        self._offset = 0

    def add(
        self, key: str, blobs: Mapping[str, bytes], meta: Mapping[str, Any] | None = None
    ) -> None:
        if key in self._keys:
            raise ValueError(f"duplicate record key {key!r} in {self.out_dir}")
        self._keys.add(key)
        if self._fh is None or len(self._records) % self.shard_size == 0:
            self._open_next_shard()
        spans = {}
        for name in sorted(blobs):
            data = bytes(blobs[name])
            try:
                self._fh.write(data)
            except OSError as e:  # "No space left on device" alone names nothing
                raise OSError(e.errno, e.strerror, self._fh.name) from e
            spans[name] = [self._offset, len(data)]
            self._offset += len(data)
        self._records.append(
            {"key": key, "shard": len(self._shards) - 1, "blobs": spans, "meta": dict(meta or {})}
        )

    def close(self, extra: Mapping[str, Any] | None = None) -> Path:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        index = {"format": FORMAT, "shards": self._shards, "records": self._records}
        if extra:
            index["extra"] = dict(extra)
        with open(self._tmp / INDEX_NAME, "w") as f:
            json.dump(index, f, separators=(",", ":"))
            f.write("\n")
        self._ctx.__exit__(None, None, None)
        return self.out_dir

    def abort(self, exc: BaseException | None = None) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with contextlib.suppress(OSError):  # a full disk fails the flush again: discard
                fh.close()
        # atomic_dir removes the temporary directory, then may re-raise what it was given
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(type(exc) if exc else RuntimeError, exc, None)

    def __len__(self) -> int:
        return len(self._records)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


class ShardReader:
    """Random access to a shard directory; safe to pickle into DataLoader workers."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        try:
            with open(index_path) as f:
                index = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{index_path}: no shard index; run the stage that writes {self.directory}"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: shard index is not valid JSON ({e})") from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: unknown shard format {index.get('format')!r}")
        self.shards: list[str] = index["shards"]
        self.records: list[dict[str, Any]] = index["records"]
        self.extra: dict[str, Any] = index.get("extra", {})
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: never share a descriptor's offset state
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.directory / self.shards[shard], os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def __len__(self) -> int:
        return len(self.records)

    def keys(self) -> list[str]:
        return [r["key"] for r in self.records]

    def meta(self, i: int) -> dict[str, Any]:
        return self.records[i]["meta"]

    def blob(self, i: int, name: str) -> bytes:
        rec = self.records[i]
        offset, length = rec["blobs"][name]
        data = os.pread(self._fd(rec["shard"]), length, offset)
        if len(data) != length:
            raise OSError(
                f"{self.directory / self.shards[rec['shard']]}: truncated shard "
                f"(record {rec['key']!r} wants {length} bytes at {offset}, got {len(data)})"
            )
        return data

    def __getitem__(self, i: int) -> Record:
        rec = self.records[i]
        return Record(rec["key"], {n: self.blob(i, n) for n in rec["blobs"]}, rec["meta"])

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:
            pass
