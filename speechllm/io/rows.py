"""A row index of a large JSONL file: byte offsets and a few per-row columns as numpy arrays,
saved beside the file and memory-mapped, so that a file of millions of records opens in about a
second without holding a Python object per record; a record is parsed only when it is read.

    index = RowIndex.open("train.targets.jsonl", "targets/1", extract, {"seconds": "float32"})
    index.column("seconds")[i], index.read(i)   # (line number, the record as a dict)

`extract(record, where)` turns one parsed record into its column values (it raises
`JsonlError` naming `where`, "file:line", for a record it cannot use); a column of dtype
`"category"` holds strings, stored once each (codes per row plus one table of distinct values).
The index lives in a hidden folder beside the file, `.<name>.rows/`; it is rebuilt when the file's
size, modification time or first and last bytes change, or when `kind` (the extractor's name and
version) does. Building it reads the file once, parses every line (malformed lines are errors
naming the file and line, as `read_jsonl` reports them) and takes the file's sha256 on the way.
A folder that cannot be written keeps the index in memory only.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .jsonl import JsonlError, _parse

INDEX_VERSION = 1
"""Bumped when the layout of the index folder changes; older folders are rebuilt."""
HEADER = "header.json"
READ_CHUNK = 1 << 24
"""Bytes read at a time while building."""
PROBE_BYTES = 1 << 16
"""The first and last this many bytes of the file are hashed into the freshness check."""
CATEGORY = "category"
"""Column dtype of a string column stored as codes into a table of distinct values."""
TYPECODES = {"float32": "f", "float64": "d", "uint8": "B", "int32": "i", "uint32": "I", "int64": "q"}
"""numpy dtype -> `array.array` typecode used while building (compact, no object per value)."""
PROGRESS_BYTES = 256 << 20
"""Files at least this large show a progress bar while their index is built."""
PARALLEL_BYTES = 64 << 20
"""A file gets one index-building process per this many bytes (up to one per CPU)."""


def index_folder(path: Path) -> Path:
    """Where the index of `path` lives: `.<name>.rows/` beside it."""
    return path.with_name(f".{path.name}.rows")


def _probe(path: Path, size: int) -> str:
    """sha256 of the file's first and last `PROBE_BYTES` (cheap evidence it is the same file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(PROBE_BYTES))
        f.seek(max(0, size - PROBE_BYTES))
        h.update(f.read(PROBE_BYTES))
    return h.hexdigest()


class RowIndex:
    """The row index of one JSONL file (see the module docstring)."""

    def __init__(self, path: Path, header: dict, arrays: dict[str, np.ndarray], saved: bool):
        self.path, self.header, self._arrays, self.saved = path, header, arrays, saved
        self.offsets: np.ndarray = arrays["_offsets"]
        """Byte offset of each record's line (uint64), file order."""
        self.lines: np.ndarray = arrays["_lines"]
        """1-based line number of each record (blank lines are not records)."""
        self._fd: int | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, kind: str, extract: Callable[[dict, str], dict[str, Any]],
             columns: dict[str, str], progress: bool = True) -> "RowIndex":
        """The index of `path` for `kind`: the saved one when it is fresh, else built (and saved
        when the folder is writable). A path that is no readable file is a `JsonlError`."""
        path = Path(path)
        try:
            st = path.stat()
        except OSError as err:
            raise JsonlError(f"{path}: cannot be read ({err.strerror or err})") from None
        if not path.is_file():
            raise JsonlError(f"{path}: is a folder, not a JSONL file")
        stamp = {"index_version": INDEX_VERSION, "kind": kind, "columns": columns, "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "probe": _probe(path, st.st_size)}
        folder = index_folder(path)
        loaded = cls._load(path, folder, stamp)
        if loaded is not None:
            return loaded
        header, arrays = _build(path, extract, columns, progress and st.st_size >= PROGRESS_BYTES)
        header = {**stamp, **header}
        saved = _save(folder, header, arrays)
        return cls(path, header, arrays, saved)

    @classmethod
    def _load(cls, path: Path, folder: Path, stamp: dict) -> "RowIndex | None":
        try:
            header = json.loads((folder / HEADER).read_text())
            if any(header.get(k) != v for k, v in stamp.items()):
                return None
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                      for name in header["arrays"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing, stale, torn or foreign: rebuilt
        if any(len(arrays[name]) != n for name, n in header["arrays"].items()):
            return None
        return cls(path, header, arrays, True)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def digest(self) -> str:
        """"sha256:<hex>" of the file's bytes when the index was built."""
        return self.header["digest"]

    def column(self, name: str) -> np.ndarray:
        """Per-row values of a numeric column (codes for a category column)."""
        return self._arrays[name]

    def categories(self, name: str, codes: np.ndarray | None = None) -> list[str]:
        """The distinct values of category column `name` (those of `codes` only, when given),
        in code order."""
        blob, ends = self._arrays[f"{name}.blob"], self._arrays[f"{name}.ends"]
        wanted = range(len(ends)) if codes is None else np.unique(np.asarray(codes))
        return [bytes(blob[(ends[c - 1] if c else 0): ends[c]]).decode("utf-8") for c in wanted]

    def category(self, name: str, code: int) -> str:
        blob, ends = self._arrays[f"{name}.blob"], self._arrays[f"{name}.ends"]
        return bytes(blob[(ends[code - 1] if code else 0): ends[code]]).decode("utf-8")

    def read(self, row: int) -> tuple[int, dict]:
        """(line number, the parsed record) of row `row`, read from the file at its offset."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start = int(self.offsets[row])
        end = int(self.offsets[row + 1]) if row + 1 < len(self.offsets) else self.header["size"]
        number = int(self.lines[row])
        where = f"{self.path}:{number}"
        raw = os.pread(self._fd, end - start, start)
        try:
            record, error = _parse(raw.decode("utf-8"), where)
        except UnicodeDecodeError:
            record, error = None, f"{where}: not UTF-8 text"
        if error is not None:
            raise JsonlError(f"{error} (the file changed since it was indexed?)")
        return number, record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def _fast_parse(raw: bytes) -> dict | None:
    """The JSON object on a line, parsed by orjson (about 3x faster than json); None when orjson
    refuses the line or it is no object (then `_parse` decides, with the reader's own message).
    orjson refuses what `_parse` refuses (invalid UTF-8, lone surrogates) and a little more (NaN,
    integers past 64 bits), never less."""
    import orjson

    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class _RangeError(Exception):
    """A bad line inside a byte range: its line number counted from the range's start."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message

    def __reduce__(self):  # raised in a worker process, re-raised here
        return _RangeError, (self.line, self.message)


_WHERE_MARK = "\x00line\x00"
"""Stands for the line number in a range worker's messages until the range's first line is known."""
_JOB: dict[str, Any] = {}
"""What forked range workers read: the path, extractor and columns (inherited, never pickled)."""


def _scan_range(start: int, end: int) -> dict:
    """Parse the lines in bytes [start, end) of the job's file (a range starts at a line's start):
    absolute offsets, line numbers relative to the range, column values, category tables, and the
    range's line count. A bad line is a `_RangeError`."""
    path, extract, columns = _JOB["path"], _JOB["extract"], _JOB["columns"]
    offsets, lines = array.array("Q"), array.array("Q")
    values = {name: array.array(TYPECODES.get(dtype, "I")) for name, dtype in columns.items()}
    tables: dict[str, dict[str, int]] = {name: {} for name, dtype in columns.items() if dtype == CATEGORY}
    numeric = [(name, values[name].append) for name, dtype in columns.items() if dtype != CATEGORY]
    category = [(name, values[name].append, tables[name]) for name in tables]
    add_offset, add_line = offsets.append, lines.append
    prefix = f"{path}:"
    read, line_pos, number, tail = start, start, 0, b""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            chunk = f.read(min(READ_CHUNK, end - read)) if read < end else b""
            read += len(chunk)
            data = tail + chunk
            if chunk:
                parts = data.split(b"\n")
                tail = parts.pop()
            elif data:
                parts, tail = [data], b""  # the file's last line, without a newline
            else:
                break
            for raw in parts:
                number += 1
                line_start, line_pos = line_pos, line_pos + len(raw) + 1
                if not raw.strip():
                    continue
                record = _fast_parse(raw)
                where = prefix + _WHERE_MARK + str(number)
                if record is None:  # the reader's own parse: it accepts what orjson does not, or says why not
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise _RangeError(number, f"{where}: not UTF-8 text (byte {err.start + 1})") from None
                    record, error = _parse(text, where)
                    if error is not None:
                        raise _RangeError(number, error)
                try:
                    row = extract(record, where)
                except JsonlError as err:
                    raise _RangeError(number, str(err)) from None
                add_offset(line_start)
                add_line(number)
                for name, add in numeric:
                    add(row[name])
                for name, add, table in category:
                    add(table.setdefault(str(row[name]), len(table)))
            if not chunk:
                break
    return {"offsets": offsets, "lines": lines, "values": values, "tables": {k: list(v) for k, v in tables.items()},
            "count": number}


def _ranges(path: Path, size: int, n: int) -> list[tuple[int, int]]:
    """`n` byte ranges of the file, each starting at a line's start."""
    starts = [0]
    with open(path, "rb") as f:
        for i in range(1, n):
            f.seek(max(starts[-1], size * i // n))
            f.readline()
            if f.tell() >= size:
                break
            if f.tell() > starts[-1]:
                starts.append(f.tell())
    return list(zip(starts, starts[1:] + [size]))


def _file_digest(path: Path, bar) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return "sha256:" + h.hexdigest()


def build_workers(size: int) -> int:
    """Processes that build the index of a file of `size` bytes: one per `PARALLEL_BYTES`, at most
    one per CPU this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, size // PARALLEL_BYTES))


def _build(path: Path, extract: Callable[[dict, str], dict[str, Any]], columns: dict[str, str],
           progress: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and parse every line of `path` once, over byte ranges in parallel (forked workers)
    while this process takes the file's sha256: (header fields, arrays)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    t0 = time.perf_counter()
    size = path.stat().st_size
    workers = build_workers(size) if "fork" in mp.get_all_start_methods() else 1
    ranges = _ranges(path, size, workers)
    _JOB.update(path=path, extract=extract, columns=columns)
    bar = tqdm(total=size, desc=f"index {path.name}", unit="B", unit_scale=True, disable=not progress,
               file=sys.stderr)
    try:
        if len(ranges) > 1:
            with ProcessPoolExecutor(len(ranges), mp_context=mp.get_context("fork")) as pool:
                futures = [pool.submit(_scan_range, a, b) for a, b in ranges]
                digest = _file_digest(path, bar)
                parts = []
                for fut in futures:
                    try:
                        parts.append(fut.result())
                    except _RangeError as err:
                        parts.append(err)
        else:
            try:
                parts = [_scan_range(*ranges[0])] if ranges else []
            except _RangeError as err:
                parts = [err]
            digest = _file_digest(path, bar)
    finally:
        _JOB.clear()
        bar.close()
    first_line = 0
    for part in parts:  # the first bad line in file order, with its line number in the file
        if isinstance(part, _RangeError):
            raise JsonlError(part.message.replace(_WHERE_MARK + str(part.line), str(first_line + part.line)))
        first_line += part["count"]
    arrays: dict[str, np.ndarray] = {}
    line_base, lines = 0, []
    for part in parts:
        lines.append(np.frombuffer(part["lines"], np.uint64) + np.uint64(line_base) if len(part["lines"])
                     else np.zeros(0, np.uint64))
        line_base += part["count"]
    arrays["_lines"] = np.concatenate(lines) if lines else np.zeros(0, np.uint64)
    arrays["_offsets"] = _concat([p["offsets"] for p in parts], np.uint64)
    for name, dtype in columns.items():
        if dtype != CATEGORY:
            arrays[name] = _concat([p["values"][name] for p in parts], np.dtype(dtype))
            continue
        table: dict[str, int] = {}
        codes = []
        for part in parts:  # each range numbered its own values: renumber into one table
            remap = np.array([table.setdefault(v, len(table)) for v in part["tables"][name]], np.uint32)
            local = np.frombuffer(part["values"][name], np.uint32) if len(part["values"][name]) else \
                np.zeros(0, np.uint32)
            codes.append(remap[local] if len(local) else local)
        encoded = [v.encode("utf-8") for v in table]
        arrays[f"{name}.blob"] = np.frombuffer(b"".join(encoded), np.uint8).copy()
        arrays[f"{name}.ends"] = np.cumsum([len(e) for e in encoded], dtype=np.uint64)
        arrays[name] = np.concatenate(codes) if codes else np.zeros(0, np.uint32)
    header = {"digest": digest, "rows": len(arrays["_offsets"]), "build_workers": len(ranges),
              "build_seconds": round(time.perf_counter() - t0, 2)}
    return header, arrays


def _concat(chunks: list[array.array], dtype: np.dtype) -> np.ndarray:
    parts = [np.frombuffer(c, dtype) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _save(folder: Path, header: dict, arrays: dict[str, np.ndarray]) -> bool:
    """Write the index into `folder` atomically (a temporary folder renamed into place); False
    when it cannot be written (a read-only folder): it is then used from memory."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        header = {**header, "arrays": {name: len(arr) for name, arr in arrays.items()}}
        (tmp / HEADER).write_text(json.dumps(header, indent=2) + "\n")
        old = folder.with_name(f"{folder.name}.{os.getpid()}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


# ----------------------------------------------------------------------------- merging shards

def id_hashes(ids) -> np.ndarray:
    """64-bit hashes (blake2b) of record ids, as uint64: a compact stand-in for a dict of ids."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
                        for i in ids), np.uint64)


class OrderRanks:
    """The position of each id in an order, looked up by hash (16 bytes per id, not a dict)."""

    def __init__(self, order: list[str]):
        hashes = id_hashes(order)
        self._sort = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._sort]
        self.size = len(order)

    def ranks(self, ids: list[str]) -> np.ndarray:
        """Positions of `ids` in the order; `size` for an id not in it."""
        if not ids:
            return np.zeros(0, np.int64)
        h = id_hashes(ids)
        idx = np.minimum(np.searchsorted(self._sorted, h), max(self.size - 1, 0))
        found = (self._sorted[idx] == h) if self.size else np.zeros(len(h), bool)
        return np.where(found, self._sort[idx] if self.size else 0, self.size).astype(np.int64)


def _scan_ids(path: Path) -> tuple[array.array, array.array, list[str]]:
    """(line offsets, line lengths, ids) of the usable records of a JSONL file (malformed lines and
    records without an id are skipped, as a torn line is)."""
    offsets, lengths, ids = array.array("Q"), array.array("Q"), []
    pos = 0
    with open(path, "rb") as f:
        for raw in f:
            start, pos = pos, pos + len(raw)
            if not raw.endswith(b"\n"):
                continue  # a torn last line
            record = _fast_parse(raw)
            if record is None:
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):
                    continue
            if isinstance(record, dict) and "id" in record:
                offsets.append(start)
                lengths.append(len(raw))
                ids.append(str(record["id"]))
    return offsets, lengths, ids


def merge_in_order(final: Path, sources: list[Path], order: list[str], progress: bool = False) -> int:
    """Merge `final` (an earlier merge, if it exists) and the shard files `sources` into `final`,
    records sorted by the position of their id in `order` (ids not in it last, in file order); an
    id in several files is written once, from the first file that has it (`final` first). Lines
    are copied byte for byte; memory is a few arrays per record, never the records. The shards
    are deleted once the merged file is in place. Returns the records written."""
    from tqdm import tqdm

    files = [p for p in [final, *sources] if p.exists()]
    ranker = OrderRanks(order)
    src, offs, lens, ranks, unknown_ids = [], [], [], [], []
    for k, path in enumerate(tqdm(files, desc=f"merge {final.name}", unit="file", disable=not progress,
                                  file=sys.stderr)):
        o, n, ids = _scan_ids(path)
        r = ranker.ranks(ids)
        unknown_ids += [ids[i] for i in np.flatnonzero(r == ranker.size)]
        src.append(np.full(len(ids), k, np.int32))
        offs.append(np.frombuffer(o, np.uint64) if len(o) else np.zeros(0, np.uint64))
        lens.append(np.frombuffer(n, np.uint64) if len(n) else np.zeros(0, np.uint64))
        ranks.append(r)
        del ids
    if not files:
        return 0
    src_all, off_all, len_all, rank_all = (np.concatenate(x) for x in (src, offs, lens, ranks))
    seq = np.arange(len(rank_all))
    pick = np.lexsort((seq, rank_all))  # by rank, ties in file order (final first)
    rank_sorted = rank_all[pick]
    first = np.ones(len(pick), bool)
    first[1:] = rank_sorted[1:] != rank_sorted[:-1]
    known = rank_sorted < ranker.size
    keep = pick[(first & known) | ~known]
    if unknown_ids:  # ids outside `order`: once each, by id
        seen: set[str] = set()
        unknown_pos = {int(p): i for i, p in enumerate(np.flatnonzero(rank_all == ranker.size))}
        drop = []
        for j, p in enumerate(keep):
            i = unknown_pos.get(int(p))
            if i is not None:
                if unknown_ids[i] in seen:
                    drop.append(j)
                seen.add(unknown_ids[i])
        keep = np.delete(keep, drop)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.merge.tmp")
    fds = [os.open(p, os.O_RDONLY) for p in files]
    try:
        with open(tmp, "wb", buffering=1 << 20) as out:
            for p in keep:
                out.write(os.pread(fds[src_all[p]], int(len_all[p]), int(off_all[p])))
    finally:
        for fd in fds:
            os.close(fd)
    os.replace(tmp, final)
    for path in sources:
        path.unlink(missing_ok=True)
    return len(keep)
