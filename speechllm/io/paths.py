"""Paths that stages write and read: audio paths rebased from one file's folder to another's, and
the checks on an output path made before anything is written."""

from __future__ import annotations

import os
from pathlib import Path


def rebase(audio: str, from_dir: str | Path, to_dir: str | Path) -> str:
    """`audio`, relative to `from_dir` (or absolute), as the path that names the same file from
    `to_dir`: relative when it can be, absolute otherwise (another drive); an absolute path stays
    as it is. Lexical, like the manifest's paths: a symlink inside a folder stays a symlink."""
    if os.path.isabs(audio):
        return audio
    target = os.path.normpath(os.path.join(os.path.abspath(from_dir), audio))
    try:
        return os.path.relpath(target, os.path.abspath(to_dir))
    except ValueError:  # no relative path between two drives
        return target


def folder_problem(path: str | Path) -> str | None:
    """Why `path` cannot be, or become, a folder to write into (it or a folder above it is a
    file, or the nearest existing folder is not writable); None when it can."""
    path = Path(path)
    for p in (path, *path.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            return f"{p} is a file, not a folder" if p == path else f"{p} (above {path}) is a file, not a folder"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"cannot write into {p} (permission denied)"
        return None
    return None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` name the same file (the same path, or links to one file)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.absolute().resolve() == b.absolute().resolve()
