"""The engine's KV pool: keys and values of every running sequence, one fixed slot per sequence.

    k, v: [layers, slots, kv_heads, max_len, head_dim]

A sequence holds one slot from its prefill to its end; leaving frees the slot and moves no other
sequence's cache. The pool is allocated uninitialised, so the operating system commits its pages as
sequences first write them: resident memory follows the positions used, not the pool's capacity, and
an idle pool can give its pages back (`release_pages`).
A slot's length can be cut back (`truncate`), which a verifier of drafted tokens needs.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

MADV_DONTNEED = 4  # Linux and macOS


class KVPoolFull(RuntimeError):
    """No free slot for a new sequence."""


class KVPool:
    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        if slots < 1:
            raise ValueError(f"a KV pool needs at least one slot, got {slots}")
        shape = (n_layers, slots, n_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: the lowest slot first
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise KVPoolFull(f"all {self.slots} KV slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"KV slot {slot} is not in use")
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)

    def truncate(self, slot: int, length: int) -> None:
        """Forget the positions of `slot` from `length` on."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"KV slot {slot} holds {self.lengths[slot]} positions; cannot cut back to {length}")
        self.lengths[slot] = length

    def release_pages(self) -> None:
        """Give an idle pool's memory back to the system (CPU): its pages are committed again as sequences
        write them. Without this, the positions warm-up wrote stay resident with no sequence to read them."""
        if self.free != self.slots:
            raise RuntimeError(f"KV slots in use: {self.slots - self.free}; their caches cannot be released")
        if self.k.device.type == "cpu":
            _discard_pages(self.k)
            _discard_pages(self.v)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give `target` the first `length` positions of `source` (sequences that share a prompt)."""
        self.k[:, target, :, :length] = self.k[:, source, :, :length]
        self.v[:, target, :, :length] = self.v[:, source, :, :length]
        self.lengths[target] = length


def _discard_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) over the whole pages of a tensor's memory: they read as zeros until written.
    Where the C library has no madvise, the memory stays resident."""
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, TypeError, AttributeError):  # no C library with madvise (Windows)
        return
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (tensor.data_ptr() + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
