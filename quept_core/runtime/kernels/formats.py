"""Packed weight formats and their matmul paths.

Every format stores one quantized weight `Ŵ = (q - z) * s` (integer codes q, per-group scale s and
integer zero-point z, see quantizer.py) in real low-bit storage and offers:

- `linear(x)`: the decode path for a few rows of activations (packed kernel, no dense weight);
- `dense()`: the weight dequantized to the compute dtype, for prefill's dense matmul;
- `rows(ids)`: dequantized rows, for the tied embedding lookup;
- `nbytes`: the resident bytes.

Calling a pack picks the decode or the prefill path by the number of rows. Which format holds a
weight, and whether prefill dequantizes to a dense matmul, is chosen once per weight shape and
bit-width on the running device: correctness against the dequantized reference first, then speed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from quept_core.quant.grid import QuantizedWeight
from quept_core.runtime.kernels.choices import Choice, ChoiceBook
from quept_core.runtime.kernels.native import (
    int4pack_dequant,
    lut_dequant,
    lut_gemv,
    planes_dequant,
    planes_gemv,
)

log = logging.getLogger(__name__)

# Up to this many tokens per sequence a call takes the packed kernel (decode, short prompts), whatever
# `prefill_dense` says: a short prompt's tokens go the way each generated token does. Dequantizing
# every weight costs a call about 25 ms on the 2-core Zen 4 machine; the packed kernels prefilled 20-64
# tokens 1.1-2.1x faster than that path (w3, w4, w8; `benchmarks/served_prefill.py`, docs/runtime.md).
# Deciding per sequence, not per batch, keeps a sequence's output the same alone or batched with others.
PACKED_MAX_TOKENS = 64
# Rows used to time the prefill path when choosing between it and dequantize-then-matmul.
PREFILL_PROBE_ROWS = 256
# Prefill takes a format's own kernel only when it beats dequantize + dense bf16 matmul by this factor:
# bf16 activations keep prefill (and the perplexity measured through it) closest to the float model, and
# a near tie must not flip with the machine's load from one measurement to the next. At 1.25x, once the
# bit-plane kernels ran on both threads they won most shapes on the 2-core Zen 4 machine, and their int8
# activations moved the engine's perplexity by +0.3 % at w8 and +0.6 % at w3 for no measurable prefill
# speed (`quept bench`).
PREFILL_PACKED_GAIN = 2.0
# Decode kernels are timed at these running-set sizes (a sequence alone, and a busy server's step) and
# the format with the least total wins.
DECODE_PROBE_ROWS = (1, 8)
# The stated tolerance of a packed matmul against the dequantized float32 reference (bf16
# activations and bf16 outputs; relative Frobenius error).
PACK_REL_TOL = 0.02
# The CPU int4 kernel packs 64 output rows per block: byte (k, j) holds rows j (low) and j + 32 (high).
_INT4_BLOCK_N = 64
_INT4_GROUPS = (32, 64, 128, 256)
# Bit planes per bit-width, lowest bits first: a b-bit code costs exactly b bits of storage.
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
# Codes are packed in chunks of this many consecutive input features, and output rows in tiles of this many
# (bit planes and lookup-table planes).
CHUNK = 64
TILE = 16


class PackedWeight:
    """Base class: shapes, dequantization from codes, and the two matmul paths."""

    out_features: int
    in_features: int
    dtype: torch.dtype
    # Whether calls with many rows dequantize and run one dense matmul (else they take `linear`).
    prefill_dense: bool = True

    def linear(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in `out_dtype` (default: x's); the output head asks for float32 logits."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # ---- on disk (runtime/packfiles.py) ---------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What restores this pack without packing again: its plain attributes and its tensors (a list of
        tensors as `name.0`, `name.1`, ...). Kernel handles are not state: `_bind` looks them up again."""
        attrs, tensors = {}, {}
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, list):
                attrs[key] = {"tensors": len(value)}
                tensors |= {f"{key}.{i}": t for i, t in enumerate(value)}
            elif isinstance(value, torch.dtype):
                attrs[key] = {"dtype": str(value).removeprefix("torch.")}
            else:
                attrs[key] = value
        return attrs, tensors

    @classmethod
    def restore(cls, attrs: dict, tensors: dict[str, torch.Tensor]) -> PackedWeight:
        """The pack `state()` described, over `tensors` (already on the device it runs on)."""
        pack = cls.__new__(cls)
        for key, value in attrs.items():
            if isinstance(value, dict) and "tensors" in value:
                value = [tensors[f"{key}.{i}"] for i in range(value["tensors"])]
            elif isinstance(value, dict):
                value = getattr(torch, value["dtype"])
            setattr(pack, key, value)
        for key, tensor in tensors.items():
            if "." not in key:
                setattr(pack, key, tensor)
        pack._bind()
        return pack

    def _bind(self) -> None:
        """Look up the native kernels this format calls (formats without any have nothing to do)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, tokens, in] or [tokens, in]."""
        if self.prefill_dense and x.shape[-2] > PACKED_MAX_TOKENS:
            return F.linear(x, self.dense())
        return self.linear(x)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    """(codes - zero) * scale per group: codes [n, k], scale/zero [n, ceil(k / group)] -> [n, k]."""
    n, k = codes.shape
    pad = scale.shape[1] * group - k
    grouped = F.pad(codes.float(), (0, pad)).reshape(n, -1, group)
    weight = (grouped - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return weight.reshape(n, -1)[:, :k].to(dtype)


class DenseWeight(PackedWeight):
    """An unquantized weight (the `fp` plan).

    On CPU a float32 weight is kept as it is, by reference (no copy), and multiplied in float32:
    PyTorch's float32 matrix-vector products beat its bf16 ones on CPUs (69 µs against 175 µs for
    1536 x 576 on the development machine). Elsewhere it is converted to the compute dtype. The native
    decode step reads bf16 only (csrc/dense.h); the engine hands it bf16 weights where that step runs.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        weight = weight.detach()
        keep = weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
        self.weight = weight if keep else weight.to(dtype).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.dtype = dtype

    def linear(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(out_dtype or x.dtype)

    def dense(self) -> torch.Tensor:
        return self.weight.to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Int4Packed(PackedWeight):
    """Codes of <= 4 bits in PyTorch's CPU int4 layout, for `_weight_int4pack_mm_for_cpu`.

    The kernel computes w = (c - 8) * s + m per group; with m = (8 - z) * s this is exactly
    (c - z) * s, up to bf16 rounding of s and m.
    """

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        n, k = qw.codes.shape
        self.out_features, self.in_features, self.dtype, self.group = n, k, dtype, qw.group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32).contiguous(), 2)
        offset = (8 - qw.zero) * qw.scale
        self.scale_zero = torch.stack([qw.scale, offset], dim=-1).transpose(0, 1).contiguous().to(dtype)
        self._bind()
        if not torch.equal(self._codes(torch.arange(n, device=qw.codes.device)), qw.codes):
            raise ValueError(f"int4 layout check failed for a [{n}, {k}] weight")

    def _bind(self) -> None:
        self._native_dequant = int4pack_dequant() if self.dtype == torch.bfloat16 else None

    @staticmethod
    def supports(qw: QuantizedWeight, device: torch.device) -> bool:
        n, k = qw.codes.shape
        # 4 bits only: storing 3-bit codes here would spend a bit per weight for nothing.
        return (device.type == "cpu" and qw.bits == 4 and qw.group_size in _INT4_GROUPS
                and k % qw.group_size == 0 and n % _INT4_BLOCK_N == 0)

    def _codes(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = self.packed.reshape(self.out_features // _INT4_BLOCK_N, self.in_features, _INT4_BLOCK_N // 2)
        half = _INT4_BLOCK_N // 2
        within = ids % _INT4_BLOCK_N
        byte = blocks[ids // _INT4_BLOCK_N, :, within % half]  # [len(ids), k]
        shift = (4 * (within // half)).to(torch.uint8).unsqueeze(-1)
        return (byte >> shift) & 15

    def _scale_zero_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale_zero[:, ids, 0].float().T
        zero = 8 - self.scale_zero[:, ids, 1].float().T / scale
        return scale, zero

    def linear(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        return out.reshape(*x.shape[:-1], self.out_features).to(out_dtype or x.dtype)

    def dense(self) -> torch.Tensor:
        if self._native_dequant is not None:
            return self._native_dequant(self.packed, self.scale_zero, self.group).to(self.dtype)
        # Whole blocks unpack with a reshape: [blocks, k, 32] bytes -> [blocks, 64 rows, k] codes.
        blocks = self.packed.reshape(self.out_features // _INT4_BLOCK_N, self.in_features, _INT4_BLOCK_N // 2)
        codes = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(self.out_features, -1)
        return self._dequant(codes, torch.arange(self.out_features, device=self.packed.device))

    def _dequant(self, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # w = (c - 8) * s + m, the kernel's own formula, so dense and packed paths agree.
        n, k = codes.shape
        s = self.scale_zero[:, ids, 0].float().T.unsqueeze(-1)
        m = self.scale_zero[:, ids, 1].float().T.unsqueeze(-1)
        weight = (codes.float().reshape(n, -1, self.group) - 8) * s + m
        return weight.reshape(n, k).to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self._dequant(self._codes(flat), flat).reshape(*ids.shape, self.in_features)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scale_zero]


class Int8Channel(PackedWeight):
    """Per-channel codes of <= 8 bits as int8, for `_weight_int8pack_mm` (w = c8 * s).

    With c8 = q - 2^(b-1) the kernel gives x @ ((q - 2^(b-1)) * s)^T; adding sum(x) * (2^(b-1) - z) * s
    per output channel makes it exactly x @ ((q - z) * s)^T.
    """

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        n, k = qw.codes.shape
        self.out_features, self.in_features, self.dtype = n, k, dtype
        half = 2 ** (qw.bits - 1)
        self.codes = (qw.codes.to(torch.int16) - half).to(torch.int8).contiguous()
        self.scale = qw.scale[:, 0].to(dtype).contiguous()
        self.offset = ((half - qw.zero[:, 0]) * self.scale.float()).contiguous()  # float32 [n]

    @staticmethod
    def supports(qw: QuantizedWeight, device: torch.device) -> bool:
        # 8 bits only: fewer bits per channel belong in dense bit planes.
        return qw.bits == 8 and (qw.group_size == -1 or qw.group_size >= qw.codes.shape[1])

    def linear(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale)
        out = (out.float() + flat.float().sum(-1, keepdim=True) * self.offset).to(out_dtype or x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        return ((self.codes.float() * self.scale.float().unsqueeze(-1)) + self.offset.unsqueeze(-1)).to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.codes[ids].float() * self.scale[ids].float().unsqueeze(-1) + self.offset[ids].unsqueeze(-1)
        return weight.to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.offset]


def _tile_registers(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, k] as [n/16, k/64, 16 (t), 64 (byte 4r + j)]: the code of tile row r at chunk input 4t + j."""
    n, k = codes.shape
    grid = codes.reshape(n // TILE, TILE, k // CHUNK, CHUNK // 4, 4)  # [tiles, r, chunks, t, j]
    return grid.permute(0, 2, 3, 1, 4).reshape(n // TILE, k // CHUNK, CHUNK // 4, 64)


def pack_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Split b-bit codes [n, k] into bit planes in tiles (exactly b bits per code in total; csrc/planes.h).

    Per (tile of 16 rows, chunk of 64 inputs), register t's byte 4r + j holds the code of row r at input
    4t + j; a width-w plane packs 8 / w registers per 64-byte vector, register v * (8 / w) + s at shift
    w * s: unpacking one is a load and, per plane, one bit move (csrc/planes.h).
    """
    n, k = codes.shape
    registers = _tile_registers(codes.to(torch.uint8))
    planes, low = [], 0
    for width in PLANES[bits]:
        per_vector = 8 // width
        values = ((registers >> low) & ((1 << width) - 1)).reshape(n // TILE, k // CHUNK, -1, per_vector, 64)
        plane = values[:, :, :, 0].clone()
        for s in range(1, per_vector):
            plane |= values[:, :, :, s] << (width * s)
        planes.append(plane.reshape(n // TILE, -1).contiguous())
        low += width
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """The inverse of `pack_planes`: uint8 codes [n, k]."""
    tiles = planes[0].shape[0]
    registers = torch.zeros(tiles, k // CHUNK, CHUNK // 4, 64, dtype=torch.uint8, device=planes[0].device)
    low = 0
    for plane, width in zip(planes, PLANES[bits]):
        per_vector = 8 // width
        vectors = plane.reshape(tiles, k // CHUNK, -1, 1, 64)
        shifts = (torch.arange(per_vector, device=plane.device, dtype=torch.uint8) * width).reshape(1, 1, 1, -1, 1)
        values = ((vectors >> shifts) & ((1 << width) - 1)).reshape(registers.shape)
        registers |= values << low
        low += width
    grid = registers.reshape(tiles, k // CHUNK, CHUNK // 4, TILE, 4).permute(0, 3, 1, 2, 4)  # [tiles, r, chunks, t, j]
    return grid.reshape(tiles * TILE, k)


def _tiled(values: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group values [n, groups] as [n/16, groups, 16]."""
    n, groups = values.shape
    return values.reshape(n // TILE, TILE, groups).transpose(1, 2).contiguous()


def _untiled(values: torch.Tensor) -> torch.Tensor:
    """The inverse of `_tiled`: [n/16, groups, 16] -> [n, groups]."""
    return values.transpose(1, 2).reshape(-1, values.shape[1])


def _dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ids: torch.Tensor, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` (any shape) of a weight with tiled scales and zero-points, from their codes [ids.numel(), k]."""
    flat = ids.reshape(-1)
    weight = _dequantize(codes, _untiled(scale)[flat], _untiled(zero)[flat], group, dtype)
    return weight.reshape(*ids.shape, codes.shape[1])


def _grid_fits_packs(qw: QuantizedWeight) -> bool:
    """Whether float16 scales and uint8 zero-points hold this weight's grid exactly. The grid's scales
    are float16 values; its zero-points lie in 0..255 unless a group's weights are all of one sign (none
    in the models measured), and such a weight takes another format."""
    return torch.equal(qw.scale.to(torch.float16).float(), qw.scale.float()) and bool(
        ((qw.zero >= 0) & (qw.zero <= 255)).all())


def _tiled_scale_zero(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's scales (float16) and integer zero-points (uint8) as [n/16, groups, 16]."""
    if not _grid_fits_packs(qw):
        raise ValueError("the scales are not float16 values or the zero-points lie outside 0..255")
    return _tiled(qw.scale).to(torch.float16), _tiled(qw.zero).to(torch.uint8)


class BitPlanes(PackedWeight):
    """Any 2..8-bit codes in bit planes, in tiles of 16 output rows (exactly b bits per weight).

    The decode path is the native int8 kernel (csrc/planes.h) on CPU; elsewhere, or without a
    compiler, it dequantizes and multiplies.
    """

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        n, k = qw.codes.shape
        self.out_features, self.in_features, self.dtype, self.bits = n, k, dtype, qw.bits
        self.group = k if qw.group_size == -1 else qw.group_size
        self.planes = pack_planes(qw.codes, qw.bits)
        self.scale, self.zero = _tiled_scale_zero(qw)
        self._bind()

    def _bind(self) -> None:
        on_cpu = self.scale.device.type == "cpu"
        self._native = planes_gemv() if on_cpu else None
        self._native_dequant = planes_dequant() if on_cpu else None

    @staticmethod
    def supports(qw: QuantizedWeight, device: torch.device) -> bool:
        n, k = qw.codes.shape
        group = k if qw.group_size == -1 else qw.group_size
        return qw.bits in PLANES and n % TILE == 0 and k % CHUNK == 0 and group % CHUNK == 0 and _grid_fits_packs(qw)

    def codes(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is None:
            return unpack_planes(self.planes, self.bits, self.in_features)
        tiles = unpack_planes([plane[ids // TILE] for plane in self.planes], self.bits, self.in_features)
        return tiles.reshape(len(ids), TILE, -1)[torch.arange(len(ids), device=ids.device), ids % TILE]

    def linear(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._native is None:
            return F.linear(x, self.dense()).to(out_dtype or x.dtype)
        flat = x.reshape(-1, self.in_features)
        # The kernel returns the activations' dtype, accumulating in float32 either way.
        out = self._native(flat.to(out_dtype or x.dtype), self.planes, self.bits, self.scale, self.zero, self.group)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        if self._native_dequant is not None:
            weight = self._native_dequant(self.planes, self.bits, self.scale, self.zero, self.group, self.in_features)
            return weight.to(self.dtype)
        return _dequantize(self.codes(), _untiled(self.scale), _untiled(self.zero), self.group, self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return _dequantize_rows(self.codes(ids.reshape(-1)), self.scale, self.zero, ids, self.group, self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.planes, self.scale, self.zero]


LUT_BLOCK = 16  # inputs per block (four quads of four)


def pack_lut(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes [n, k] as bit-serial lookup indices [bits, n/16, k/16, 32] (layout: csrc/lut.h).

    For bit i, tile T and block j, position p = 4r + s holds the 4-bit index whose bit t is bit i of
    the code of row 16T + r at input 16j + s + 4t; byte u holds positions u (low) and u + 32 (high).
    """
    n, k = codes.shape
    # [tiles, r, blocks, t, s] -> bits of each code
    grid = codes.to(torch.uint8).reshape(n // TILE, TILE, k // LUT_BLOCK, 4, 4)
    weights = (1 << torch.arange(4, dtype=torch.uint8, device=codes.device)).reshape(1, 1, 1, 4, 1)
    planes = []
    for bit in range(bits):
        index = (((grid >> bit) & 1) * weights).sum(dim=3, dtype=torch.uint8)  # [tiles, r, blocks, s]
        positions = index.permute(0, 2, 1, 3).reshape(n // TILE, k // LUT_BLOCK, 64)  # p = 4r + s
        planes.append(positions[..., :32] | (positions[..., 32:] << 4))
    return torch.stack(planes).contiguous()


def unpack_lut(planes: torch.Tensor, bits: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `pack_lut` (for `rows` only, if given): uint8 codes [rows, k]."""
    _, tiles, blocks, _ = planes.shape
    positions = torch.cat([planes & 15, planes >> 4], dim=-1).reshape(bits, tiles, blocks, TILE, 4)
    positions = positions.permute(0, 1, 3, 2, 4).reshape(bits, tiles * TILE, blocks, 4)  # [bits, n, blocks, s]
    if rows is not None:
        positions = positions[:, rows]
    shifts = torch.arange(4, dtype=torch.uint8, device=planes.device).reshape(1, 1, 1, 4, 1)
    bits_t = (positions.unsqueeze(3) >> shifts) & 1  # [bits, n, blocks, t, s]
    codes = torch.zeros(bits_t.shape[1:], dtype=torch.uint8, device=planes.device)
    for bit in range(bits):
        codes |= bits_t[bit] << bit
    return codes.reshape(codes.shape[0], -1)


class LutPlanes(PackedWeight):
    """Any 2..7-bit codes as bit-serial lookup indices (exactly b bits per weight), for the lookup-table
    kernel (csrc/lut.h): a b-bit weight costs b table lookups, so fewer bits are faster."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        n, k = qw.codes.shape
        self.out_features, self.in_features, self.dtype, self.bits = n, k, dtype, qw.bits
        self.group = k if qw.group_size == -1 else qw.group_size
        self.planes = pack_lut(qw.codes, qw.bits)
        self.scale, self.zero = _tiled_scale_zero(qw)
        self._bind()

    def _bind(self) -> None:
        self._native, self._native_dequant = lut_gemv(), lut_dequant()

    @staticmethod
    def supports(qw: QuantizedWeight, device: torch.device) -> bool:
        n, k = qw.codes.shape
        group = k if qw.group_size == -1 else qw.group_size
        # Up to 7 bits: there a quad's table may be finer than its group's (csrc/lut.h), which keeps the
        # error near 1 %; 8-bit codes get no finer steps and land near 2.5 %.
        return (device.type == "cpu" and lut_gemv() is not None and 2 <= qw.bits <= 7 and n % TILE == 0
                and k % CHUNK == 0 and group % CHUNK == 0 and _grid_fits_packs(qw))

    def linear(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self._native(flat.to(out_dtype or x.dtype), self.planes, self.bits, self.scale, self.zero,
                           self.group)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        return self._native_dequant(self.planes, self.bits, self.scale, self.zero, self.group,
                                    self.in_features).to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        codes = unpack_lut(self.planes, self.bits, ids.reshape(-1))
        return _dequantize_rows(codes, self.scale, self.zero, ids, self.group, self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.planes, self.scale, self.zero]


FORMATS: tuple[type[PackedWeight], ...] = (Int4Packed, Int8Channel, BitPlanes, LutPlanes)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).norm() / reference.norm().clamp_min(1e-12)).item()


def _seconds(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int = 5, calls: int = 8) -> float:
    """Seconds per call: the best of a few timed runs of `calls` calls (after a warm-up call). Several
    calls per run keep timer and dispatch noise below the differences between kernels; the minimum
    shrugs off other load."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


_BOOKS: dict[str, ChoiceBook] = {}  # device -> its choices, read once per process


def _book(device: torch.device) -> ChoiceBook:
    key = str(device)
    if key not in _BOOKS:
        _BOOKS[key] = ChoiceBook(device)
    return _BOOKS[key]


def _choose(qw: QuantizedWeight, dtype: torch.dtype, candidates: list[type[PackedWeight]]) -> PackedWeight:
    device = qw.codes.device
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(PREFILL_PROBE_ROWS, qw.codes.shape[1], generator=generator, device=device).to(dtype)
    reference = x.float() @ qw.dequantize().T
    best: tuple[float, PackedWeight] | None = None
    for fmt in candidates:
        try:
            pack = fmt(qw, dtype)
            error = relative_error(pack.linear(x[:4]), reference[:4])
        except (RuntimeError, ValueError) as failure:
            log.info("%s cannot run %d-bit [%d, %d] weights here: %s", fmt.__name__, qw.bits, *qw.codes.shape, failure)
            continue
        if error > PACK_REL_TOL:
            log.warning("%s is off by %.3g on %d-bit weights; not used", fmt.__name__, error, qw.bits)
            continue
        seconds = sum(_seconds(lambda pack=pack, rows=rows: pack.linear(x[:rows]), device) for rows in DECODE_PROBE_ROWS)
        if best is None or seconds < best[0]:
            best = (seconds, pack)
    if best is None:
        return DenseWeight(qw.dequantize(), dtype)
    pack = best[1]
    packed = _seconds(lambda: pack.linear(x), device, repeats=3, calls=1)
    dense = _seconds(lambda: F.linear(x, pack.dense()), device, repeats=3, calls=1)
    pack.prefill_dense = dense < PREFILL_PACKED_GAIN * packed
    return pack


def _candidates(qw: QuantizedWeight) -> list[type[PackedWeight]]:
    device = qw.codes.device
    candidates = [fmt for fmt in FORMATS if fmt.supports(qw, device)]
    if device.type == "cpu" and BitPlanes in candidates and planes_gemv() is not None:
        # The native decode step (csrc/decode.cpp) reads bit planes and lookup-table planes: one call
        # for the whole forward beats a faster-per-call ATen kernel behind Python dispatch.
        candidates = [fmt for fmt in candidates if fmt in (BitPlanes, LutPlanes)]
    return candidates


def pack_weight(qw: QuantizedWeight, dtype: torch.dtype) -> PackedWeight:
    """Pack a quantized weight into the fastest correct format for it on its device (chosen once per
    machine, see choices.py)."""
    book = _book(qw.codes.device)
    shape = (qw.bits, qw.group_size, *qw.codes.shape, dtype)
    candidates = _candidates(qw)
    if not _grid_fits_packs(qw):
        # A property of this weight, not of its shape: chosen for it alone, and not recorded, so that the
        # other weights of the shape keep the bit-plane formats.
        log.warning("%d-bit [%d, %d] weights with a grid the bit-plane packs cannot hold exactly (a group of "
                    "one sign): packed apart", qw.bits, *qw.codes.shape)
        return _choose(qw, dtype, candidates)
    known = book.get(*shape)
    by_name = {fmt.__name__: fmt for fmt in candidates}
    if known is not None and (known.format in by_name or known.format == DenseWeight.__name__):
        fmt = by_name.get(known.format)
        pack = fmt(qw, dtype) if fmt is not None else DenseWeight(qw.dequantize(), dtype)
        pack.prefill_dense = known.prefill_dense
        return pack
    pack = _choose(qw, dtype, candidates)
    book.put(Choice(type(pack).__name__, pack.prefill_dense), *shape)
    log.info("%d-bit [%d, %d] weights: %s, prefill %s", qw.bits, *qw.codes.shape, type(pack).__name__,
             "dequantize + dense matmul" if pack.prefill_dense else "packed kernel")
    return pack


def chosen(device: torch.device, bits: int, group_size: int, out_features: int, in_features: int,
           dtype: torch.dtype) -> Choice | None:
    """The format `pack_weight` packs such a weight in on `device`, once it has been chosen."""
    return _book(device).get(bits, group_size, out_features, in_features, dtype)


def kernel_choices(device: torch.device) -> dict[str, Choice]:
    """Every shape's chosen format on `device` so far, as stored (see choices.py)."""
    return _book(device).entries()
