"""The decode step as one native call over the whole forward pass (kernels/csrc/decode.cpp).

A `NativeStep` is built for a layout and may be handed another (`relayout`): it hands the native
program every pack's storage (no copies) and, per call site, the rows each part serves. A step is
then one call with the rows' tokens, positions and KV slots; it returns float32 logits [rows, vocab].
It runs where every pack is one the native kernels read (bit planes, lookup-table planes, or a dense
weight for `fp`) and the KV pool is bf16 on the CPU (`POOL_DTYPE`); elsewhere the engine steps through
`CompactLlama.decode`.
"""

from __future__ import annotations

import torch

from quept_core.runtime.kernels.formats import BitPlanes, DenseWeight, LutPlanes, PackedWeight
from quept_core.runtime.kernels.native import decode_program_class
from quept_core.runtime.kvpool import KVPool
from quept_core.runtime.model import CompactLlama, Layout, SiteLayout

ROLES = ("qkv", "o", "gate_up", "down")  # the order of a block's sites in the native program


def _native_pack(pack: PackedWeight) -> bool:
    if isinstance(pack, BitPlanes):
        return pack.planes[0].device.type == "cpu"
    if isinstance(pack, LutPlanes):
        return True  # CPU only
    return isinstance(pack, DenseWeight) and pack.weight.device.type == "cpu" and pack.weight.is_contiguous() \
        and pack.weight.dtype == torch.bfloat16


POOL_DTYPE = torch.bfloat16  # the KV pool the native step reads and writes


def available() -> bool:
    """Whether the native step built on this machine."""
    return decode_program_class() is not None


def supports(layout: Layout, pool: KVPool) -> bool:
    """Whether the native step can run this layout over this pool."""
    if not available() or pool.k.device.type != "cpu" or pool.k.dtype != POOL_DTYPE:
        return False
    return all(_native_pack(pack) for pack in layout.packs())


class NativeStep:
    """A native decode program and the layout it runs. `relayout` gives it another layout over packs of
    the same cache generation: the packs it already holds are not handed over again."""

    def __init__(self, model: CompactLlama, layout: Layout, max_rows: int):
        d = model.dims
        norms = [n.float().contiguous() for n in (*model.attn_norms, *model.mlp_norms, model.final_norm)]
        self._program = decode_program_class()(
            [d.n_layers, d.hidden, d.ffn, d.n_heads, d.n_kv_heads, d.head_dim, d.vocab, max_rows], d.eps, norms,
            model.inv_freq.float().contiguous(), model.rope_scaling)
        self._layers = d.n_layers
        self._ids: dict[int, int] = {}  # id(pack) -> the program's weight index
        self._packs: list[PackedWeight] = []  # keeps every pack alive while the program points into it
        self._embedding = None if model.embedding is None else self._program.add_dense(model.embedding.contiguous())
        self.relayout(layout)

    def relayout(self, layout: Layout) -> None:
        """Run `layout` from now on (its packs of the generation this step was built in)."""
        self._program.clear_parts()
        for index, block in enumerate(layout.blocks):
            for role_index, role in enumerate(ROLES):
                self._add_site(index * len(ROLES) + role_index, block[role])
        self._add_site(self._layers * len(ROLES), layout.head)
        if self._embedding is not None:
            self._program.add_embedding([], self._embedding)
        for part in layout.embed:
            self._program.add_embedding(list(part.rows or ()), self._weight(part.packs[0]))

    def _weight(self, pack: PackedWeight) -> int:
        key = id(pack)
        if key not in self._ids:
            if isinstance(pack, BitPlanes):
                index = self._program.add_planes(pack.planes, pack.bits, pack.scale, pack.zero, pack.group,
                                                 pack.in_features)
            elif isinstance(pack, LutPlanes):
                index = self._program.add_lut(pack.planes, pack.bits, pack.scale, pack.zero, pack.group,
                                              pack.in_features)
            else:
                index = self._program.add_dense(pack.weight)
            self._ids[key] = index
            self._packs.append(pack)
        return self._ids[key]

    def _add_site(self, site: int, layout: SiteLayout) -> None:
        for part in layout.parts:
            weights, offsets, offset = [], [], 0
            for pack in part.packs:
                weights.append(self._weight(pack))
                offsets.append(offset)
                offset += pack.out_features
            self._program.add_part(site, list(part.rows or ()), weights, offsets)

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int], pool: KVPool) -> torch.Tensor:
        """One token per row, written to and attending over its slot up to its position."""
        return self._program.forward(tokens, positions, slots, pool.k, pool.v)
