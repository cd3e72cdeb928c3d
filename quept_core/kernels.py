"""Packed weight formats and their matmul paths.

Every format stores one quantized weight `Ŵ = (q - z) * s` (integer codes q, per-group scale s and
integer zero-point z, see quantizer.py) in real low-bit storage and offers:

- `linear(x)`: the decode path for a few rows of activations (packed kernel, no dense weight);
- `dense()`: the weight dequantized to the compute dtype, for prefill's dense matmul;
- `rows(ids)`: dequantized rows, for the tied embedding lookup;
- `nbytes`: the resident bytes.

`PackedLinear.__call__` picks the decode or the prefill path by the number of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quept_core.quantizer import QuantizedWeight

# Above this many activation rows, dequantize-to-dense + one dense matmul beats the packed kernels.
DECODE_MAX_ROWS = 16
# The CPU int4 kernel packs 64 output rows per block: byte (k, j) holds rows j (low) and j + 32 (high).
_INT4_BLOCK_N = 64
_INT4_GROUPS = (32, 64, 128, 256)
# Bit planes per bit-width, lowest bits first: a b-bit code costs exactly b bits of storage.
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
# Codes are packed in chunks of this many consecutive input features.
CHUNK = 64


class PackedWeight:
    """Base class: shapes, dequantization from codes, and the two matmul paths."""

    out_features: int
    in_features: int
    dtype: torch.dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= DECODE_MAX_ROWS:
            return self.linear(x)
        return F.linear(x, self.dense())


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    """(codes - zero) * scale per group: codes [n, k], scale/zero [n, k / group] -> [n, k]."""
    n, k = codes.shape
    grouped = codes.float().reshape(n, -1, group)
    weight = (grouped - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return weight.reshape(n, k).to(dtype)


class DenseWeight(PackedWeight):
    """An unquantized weight in the compute dtype (the `fp` plan)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.weight = weight.detach().to(dtype).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.dtype = dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dense(self) -> torch.Tensor:
        return self.weight

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


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
        if not torch.equal(self._codes(torch.arange(n, device=qw.codes.device)), qw.codes):
            raise ValueError(f"int4 layout check failed for a [{n}, {k}] weight")

    @staticmethod
    def supports(qw: QuantizedWeight, device: torch.device) -> bool:
        n, k = qw.codes.shape
        return (device.type == "cpu" and qw.bits <= 4 and qw.group_size in _INT4_GROUPS
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

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        codes = self._codes(torch.arange(self.out_features, device=self.packed.device))
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
        return qw.group_size == -1 or qw.group_size >= qw.codes.shape[1]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale)
        out = (out.float() + flat.float().sum(-1, keepdim=True) * self.offset).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        return ((self.codes.float() * self.scale.float().unsqueeze(-1)) + self.offset.unsqueeze(-1)).to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.codes[ids].float() * self.scale[ids].float().unsqueeze(-1) + self.offset[ids].unsqueeze(-1)
        return weight.to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.offset]


def pack_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Split b-bit codes [n, k] into dense bit planes (exactly b bits per code in total).

    A plane of width w packs 8 / w codes per byte. Inside each chunk of 64 input features, byte j
    holds codes j, j + 8w, j + 16w, ... at shifts 0, w, 2w, ...: unpacking is a shift and a mask
    over contiguous bytes, which vectorizes.
    """
    n, k = codes.shape
    chunks = codes.to(torch.int32).reshape(n, k // CHUNK, CHUNK)
    planes, low = [], 0
    for width in PLANES[bits]:
        values = (chunks >> low) & ((1 << width) - 1)
        per_byte = 8 // width
        parts = values.reshape(n, k // CHUNK, per_byte, CHUNK // per_byte)
        shifts = (torch.arange(per_byte, device=codes.device) * width).reshape(1, 1, per_byte, 1)
        planes.append((parts << shifts).sum(dim=2).to(torch.uint8).reshape(n, -1).contiguous())
        low += width
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """The inverse of `pack_planes`: uint8 codes [n, k]."""
    n = planes[0].shape[0]
    codes = torch.zeros(n, k // CHUNK, CHUNK, dtype=torch.uint8, device=planes[0].device)
    low = 0
    for plane, width in zip(planes, PLANES[bits]):
        per_byte = 8 // width
        chunk_bytes = CHUNK // per_byte
        grouped = plane.reshape(n, k // CHUNK, 1, chunk_bytes)
        shifts = (torch.arange(per_byte, device=plane.device, dtype=torch.uint8) * width).reshape(1, 1, per_byte, 1)
        values = ((grouped >> shifts) & ((1 << width) - 1)).reshape(n, k // CHUNK, CHUNK)
        codes |= values << low
        low += width
    return codes.reshape(n, k)


class BitPlanes(PackedWeight):
    """Any 2..8-bit grouped codes in dense bit planes; the decode path dequantizes and multiplies."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        n, k = qw.codes.shape
        self.out_features, self.in_features, self.dtype, self.bits = n, k, dtype, qw.bits
        self.group = k if qw.group_size == -1 else qw.group_size
        self.planes = pack_planes(qw.codes, qw.bits)
        self.scale = qw.scale.float().contiguous()
        self.zero = qw.zero.to(torch.int16).contiguous()
        if not torch.equal(self.zero.float(), qw.zero):
            raise ValueError("zero-points do not fit int16")

    @staticmethod
    def supports(qw: QuantizedWeight, device: torch.device) -> bool:
        k = qw.codes.shape[1]
        group = k if qw.group_size == -1 else qw.group_size
        return qw.bits in PLANES and k % CHUNK == 0 and k % group == 0

    def codes(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        planes = self.planes if ids is None else [p[ids] for p in self.planes]
        return unpack_planes(planes, self.bits, self.in_features)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense())

    def dense(self) -> torch.Tensor:
        return _dequantize(self.codes(), self.scale, self.zero, self.group, self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        weight = _dequantize(self.codes(flat), self.scale[flat], self.zero[flat], self.group, self.dtype)
        return weight.reshape(*ids.shape, self.in_features)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.planes, self.scale, self.zero]


# Candidate formats in order of preference; the first one that supports a weight is used.
FORMATS: tuple[type[PackedWeight], ...] = (Int4Packed, Int8Channel, BitPlanes)


def pack_weight(qw: QuantizedWeight, dtype: torch.dtype) -> PackedWeight:
    """Pack a quantized weight into the best format this device supports for it."""
    device = qw.codes.device
    for fmt in FORMATS:
        if fmt.supports(qw, device):
            return fmt(qw, dtype)
    return DenseWeight(qw.dequantize(), dtype)
