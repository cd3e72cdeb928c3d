"""Which packed format serves each weight shape and bit-width, measured once per machine and kept on disk.

Timing every candidate format costs seconds per shape at start-up, and the answer depends only on the
machine: the CPU or GPU, the number of threads, torch and the kernels' source. So it is measured once,
written atomically to the QuEPT cache and read at every later start. The file names what it was
measured for; a machine that differs in any of these gets a file of its own. Delete the file to
measure again (for instance after measuring under heavy load).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from quept_core.io.atomic import file_lock, write_json_atomic
from quept_core.io.paths import cache_dir
from quept_core.runtime.kernels.native import machine_key

log = logging.getLogger(__name__)

RULES = 3  # how formats.py chooses; a change of the rules measures every shape again


@dataclass(frozen=True)
class Choice:
    format: str  # the PackedWeight class name
    prefill_dense: bool  # prefill dequantizes and runs a dense matmul instead of the format's kernel


def _shape_key(device: torch.device, bits: int, group: int, out_features: int, in_features: int,
               dtype: torch.dtype) -> str:
    return f"{device.type}/w{bits}/g{group}/{out_features}x{in_features}/{dtype}".replace("torch.", "")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def machine_digest(device: torch.device, *more: str) -> str:
    """A short hash of what measurements on `device` depend on (torch, the CPU, the kernels, the device,
    the thread count) and of `more`: the name of a file of such measurements."""
    fingerprint = "|".join((machine_key(), device_name(device), f"threads={torch.get_num_threads()}", *more))
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:12]


def choices_path(device: torch.device) -> Path:
    """The file of choices for this machine, device and thread count."""
    return cache_dir() / "kernels" / f"choices-{machine_digest(device, f'rules={RULES}')}.json"


class ChoiceBook:
    """The choices of one device, in memory and in their file."""

    def __init__(self, device: torch.device):
        self.path = choices_path(device)
        self.device = device
        self._entries = self._read()

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())["choices"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("kernel choices at %s unreadable (%s); measuring again", self.path, error)
            return {}

    def get(self, *shape) -> Choice | None:
        entry = self._entries.get(_shape_key(self.device, *shape))
        return None if entry is None else Choice(entry["format"], bool(entry["prefill_dense"]))

    def put(self, choice: Choice, *shape) -> None:
        self._entries[_shape_key(self.device, *shape)] = {"format": choice.format,
                                                           "prefill_dense": choice.prefill_dense}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_suffix(".lock")):
            merged = {**self._read(), **self._entries}  # another process may have added shapes meanwhile
            write_json_atomic(self.path, {"device": device_name(self.device), "threads": torch.get_num_threads(),
                                          "torch": torch.__version__, "choices": merged})
            self._entries = merged

    def entries(self) -> dict[str, Choice]:
        return {key: Choice(e["format"], bool(e["prefill_dense"])) for key, e in self._entries.items()}
