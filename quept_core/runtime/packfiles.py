"""Packed weights on disk, so that a later start reads its packs instead of building them.

Building a pack (concatenating a fused site's codes, splitting them into bit planes or lookup
indices, checking the layout) costs seconds per plan; reading one back is a copy. The packs of one
bit-width live in one safetensors file, `<folder>/packs-v<version>/<device>/w<b>.safetensors`
(`fp.safetensors` for full precision), with each pack's format and plain attributes in the file's
metadata. A file is written atomically, once, from the resident packs of its width; a pack whose
format is not the one this machine's kernel choices now pick (kernels/choices.py) is built again by
the caller and its width's file written anew.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quept_core.io.atomic import save_tensors_atomic
from quept_core.runtime.kernels.choices import device_name
from quept_core.runtime.kernels.formats import FORMATS, DenseWeight, PackedWeight

log = logging.getLogger(__name__)

VERSION = 4  # bump when a format's attributes or tensors change meaning
_FORMATS = {fmt.__name__: fmt for fmt in (*FORMATS, DenseWeight)}
_INDEX = "packs"  # the metadata entry: {pack name: {"format": ..., "attrs": {...}}}


def _device_label(device: torch.device) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", device_name(device))


def width_file(bits: int | None) -> str:
    return "fp.safetensors" if bits is None else f"w{bits}.safetensors"


class PackFiles:
    """The pack files of one serving store on one device. Read handles stay open (memory maps) until
    `close`: callers close them after a batch of reads, so no map outlives the packs copied out of it."""

    def __init__(self, folder: Path, device: torch.device):
        self.folder = Path(folder) / f"packs-v{VERSION}" / _device_label(device)
        self.device = device
        self._stack = ExitStack()
        self._open: dict[int | None, tuple[object, dict]] = {}  # bits -> (handle, index)
        self._unreadable: set[int | None] = set()  # widths whose file failed to open this process
        self._outdated: set[int | None] = set()  # widths with a pack of a format no longer chosen

    def read(self, name: str, bits: int | None) -> PackedWeight | None:
        """The stored pack of weight `name` at `bits`, or None when there is none."""
        opened = self._handle(bits)
        if opened is None or name not in opened[1]:
            return None
        handle, index = opened
        entry = index[name]
        prefix = f"{name}/"
        tensors = {key[len(prefix):]: handle.get_tensor(key).clone() for key in entry["tensors"]}
        return _FORMATS[entry["format"]].restore(entry["attrs"], tensors)

    def nbytes(self, name: str, bits: int | None) -> int | None:
        """The resident bytes of a stored pack, without reading it; None when it is not stored."""
        opened = self._handle(bits)
        return None if opened is None or name not in opened[1] else opened[1][name]["nbytes"]

    def holds(self, bits: int | None, names: list[str]) -> bool:
        """Whether the file of width `bits` holds current packs of every weight in `names`."""
        opened = self._handle(bits)
        return opened is not None and bits not in self._outdated and all(name in opened[1] for name in names)

    def outdated(self, bits: int | None) -> None:
        """A pack of width `bits` was read in a format this machine no longer picks: the next `write`
        of the width replaces the file."""
        self._outdated.add(bits)

    def write(self, bits: int | None, packs: dict[str, PackedWeight]) -> None:
        """Store `packs` (weight name -> pack) as the file of width `bits`, replacing an older one."""
        index, tensors = {}, {}
        for name, pack in packs.items():
            attrs, state = pack.state()
            index[name] = {"format": type(pack).__name__, "attrs": attrs, "nbytes": pack.nbytes,
                           "tensors": [f"{name}/{key}" for key in state]}
            tensors |= {f"{name}/{key}": tensor for key, tensor in state.items()}
        self._forget(bits)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_tensors_atomic(self.folder / width_file(bits), tensors, metadata={_INDEX: json.dumps(index)})
        except OSError as error:  # a read-only or full cache costs later starts time, not this one its start
            log.warning("packs of %s not stored (%s); later starts build them again", width_file(bits), error)
            return
        self._outdated.discard(bits)
        log.info("stored %d packs of %s", len(packs), width_file(bits))

    def close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._open.clear()

    def _forget(self, bits: int | None) -> None:
        """Close every handle (a closed file's map goes with it) and read `bits` afresh next time."""
        self.close()
        self._unreadable.discard(bits)

    def _handle(self, bits: int | None) -> tuple[object, dict] | None:
        if bits in self._open:
            return self._open[bits]
        path = self.folder / width_file(bits)
        if bits in self._unreadable or not path.is_file():
            return None
        try:
            handle = self._stack.enter_context(safe_open(path, framework="pt", device=str(self.device)))
            index = json.loads(handle.metadata()[_INDEX])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
            log.warning("pack file %s unreadable (%s); its packs are built from the codes", path, error)
            self._unreadable.add(bits)
            return None
        if any(entry.get("format") not in _FORMATS for entry in index.values()):
            log.warning("pack file %s names a format this version does not know; not used", path)
            self._unreadable.add(bits)
            return None
        self._open[bits] = (handle, index)
        return self._open[bits]
