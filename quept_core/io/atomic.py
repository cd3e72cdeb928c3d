"""Atomic file writes: write a temporary file next to the target, flush it to disk, then rename.

A reader sees either the old file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import json
import os
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


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    temporary = _temporary(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary))
    _commit(temporary, path)
