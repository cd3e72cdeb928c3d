"""Atomic writes: build a file (or a folder) under a temporary name next to the target, flush it to
disk, then rename; and a lock that serialises writers between processes.

A reader sees either the old file or folder or the complete new one, never a half-written one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _commit(temporary: Path, path: Path) -> None:
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    temporary = _temporary(path)
    temporary.write_bytes(data)
    _commit(temporary, path)


def write_json_atomic(path: Path, obj: object) -> None:
    """Deterministic JSON (sorted keys, fixed indentation), so equal objects give equal bytes."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    temporary = _temporary(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    temporary.chmod(0o644)  # safetensors writes 0600; a server may run as another user than the writer
    _commit(temporary, path)


@contextmanager
def replacing_folder(folder: Path) -> Iterator[Path]:
    """An empty staging folder next to `folder`, renamed into its place when the block ends (an old
    `folder` is set aside first, then removed); on an error the staging folder is removed instead."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = folder.with_name(f".{folder.name}.retired-{os.getpid()}")
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs, across processes."""
    with Path(path).open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
