"""An LRU cache of packed weights keyed by (weight name, bits), bounded by resident bytes."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from quept_core.runtime.kernels.formats import PackedWeight


class MemoryLimitError(ValueError):
    """A plan's packed weights do not fit the memory limit."""


class PackCache:
    def __init__(self, build: Callable[[Hashable], PackedWeight], limit_bytes: int | None = None):
        self._build = build
        self.limit_bytes = limit_bytes
        self._packs: OrderedDict[Hashable, PackedWeight] = OrderedDict()
        self.resident_bytes = 0
        self.builds = 0
        self.build_s = 0.0  # seconds spent building packs, all told
        self.evictions = 0
        # Bumped on every eviction: a caller may keep a list of packs while the generation is unchanged.
        self.generation = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._packs

    def __len__(self) -> int:
        return len(self._packs)

    def keys(self) -> list[Hashable]:
        return list(self._packs)

    def nbytes(self, key: Hashable) -> int:
        return self._packs[key].nbytes

    def touch(self, keys: list[Hashable]) -> None:
        """Mark resident packs as just used (they become the last to be evicted)."""
        for key in keys:
            self._packs.move_to_end(key)

    def ensure(self, keys: list[Hashable]) -> list[PackedWeight]:
        """Return the packs for `keys`, building the missing ones and evicting least recently used others."""
        wanted = set(keys)
        for key in keys:
            if key in self._packs:
                self._packs.move_to_end(key)
        for key in keys:
            if key not in self._packs:
                started = time.perf_counter()
                pack = self._build(key)
                self.build_s += time.perf_counter() - started
                self.builds += 1
                self._packs[key] = pack
                self.resident_bytes += pack.nbytes
                self._evict(wanted)
        return [self._packs[key] for key in keys]

    def drop(self, keys: list[Hashable]) -> None:
        """Forget resident packs (they are built again when next needed)."""
        for key in keys:
            if key in self._packs:
                self.resident_bytes -= self._packs.pop(key).nbytes
                self.evictions += 1
                self.generation += 1

    def _evict(self, keep: set[Hashable]) -> None:
        if self.limit_bytes is None:
            return
        for key in list(self._packs):
            if self.resident_bytes <= self.limit_bytes:
                return
            if key not in keep:
                self.resident_bytes -= self._packs.pop(key).nbytes
                self.evictions += 1
                self.generation += 1
        if self.resident_bytes > self.limit_bytes:
            needed = sum(self._packs[k].nbytes for k in keep if k in self._packs)
            # Leave the cache within its limit: drop what this request built beyond it.
            for key in keep:
                if key in self._packs:
                    self.resident_bytes -= self._packs.pop(key).nbytes
                    self.generation += 1
            raise MemoryLimitError(
                f"the plan needs more than {needed / 2**20:.1f} MB of packed weights; the memory limit is "
                f"{self.limit_bytes / 2**20:.1f} MB"
            )
