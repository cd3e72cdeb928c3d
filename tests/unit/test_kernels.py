"""Packed formats against the fake-quantized reference, per bit-width and per path."""

import pytest
import torch
import torch.nn.functional as F

from quept_core.config import BitConfig
from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import QuantizedWeight, quantize, storage_bits_per_weight
from quept_core.runtime.kernels.formats import (
    BitPlanes,
    DenseWeight,
    Int4Packed,
    Int8Channel,
    LutPlanes,
    pack_lut,
    pack_planes,
    pack_weight,
    unpack_lut,
    unpack_planes,
)
from quept_core.runtime.weights import HEAD_GROUP_SIZE

BITS = BitConfig().bits
# bf16 activations and bf16 scales: relative error of a 128..256-term dot product stays under 2 %.
REL_TOL = 0.02


def elastic_linear(out_features: int, in_features: int, seed: int = 0) -> ElasticLinear:
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = torch.randn(out_features, in_features, generator=generator) * 0.05
    elastic = ElasticLinear(linear, BitConfig(), generator)
    elastic.lora_B.data.normal_(0, 0.01, generator=generator)
    return elastic


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("in_features", [256, 192])  # 192: a cut-short last group at 128
def test_packed_output_matches_fake_quant(bits, rows, in_features):
    elastic = elastic_linear(192, in_features, seed=bits)
    reference_weight = elastic.fake_quant_weight(bits).detach()
    pack = pack_weight(elastic.quantize(bits), torch.bfloat16)
    assert not isinstance(pack, DenseWeight)
    x = torch.randn(rows, in_features)
    ref = F.linear(x.bfloat16().float(), reference_weight)
    assert relative_error(pack(x.bfloat16()), ref) < REL_TOL


@pytest.mark.parametrize("bits", BITS)
def test_the_output_heads_grid_packs_for_the_native_step_at_every_width(bits):
    """The head's groups (config-independent, 8 bits included) in a format the native decode step reads."""
    qw = quantize(torch.randn(320, 192) * 0.05, bits, HEAD_GROUP_SIZE)
    pack = pack_weight(qw, torch.bfloat16)
    assert isinstance(pack, (BitPlanes, LutPlanes))
    reference = qw.dequantize()
    x = torch.randn(2, 192)
    assert relative_error(pack.linear(x.bfloat16(), torch.float32), x.bfloat16().float() @ reference.T) < REL_TOL
    ids = torch.tensor([[0, 319], [64, 5]])
    assert relative_error(pack.rows(ids), reference[ids]) < 0.01


@pytest.mark.parametrize("fmt", [Int4Packed, Int8Channel, BitPlanes, LutPlanes])
@pytest.mark.parametrize("bits", BITS)
def test_every_format_agrees_with_reference(fmt, bits):
    qw = quantize(torch.randn(128, 256) * 0.05, bits, BitConfig().group_size_for(bits))
    if not fmt.supports(qw, torch.device("cpu")):
        pytest.skip(f"{fmt.__name__} does not hold {bits}-bit weights with group {qw.group_size}")
    pack = fmt(qw, torch.bfloat16)
    reference = qw.dequantize()
    x = torch.randn(3, 256)
    assert relative_error(pack.linear(x.bfloat16()), x.bfloat16().float() @ reference.T) < REL_TOL
    assert relative_error(pack.dense(), reference) < 0.01
    ids = torch.tensor([[0, 127], [64, 5]])
    assert relative_error(pack.rows(ids), reference[ids]) < 0.01


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_bit_planes_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (32, 192), dtype=torch.uint8)
    planes = pack_planes(codes, bits)
    assert sum(p.numel() for p in planes) * 8 == codes.numel() * bits
    assert torch.equal(unpack_planes(planes, bits, 192), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_lookup_planes_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (32, 192), dtype=torch.uint8)
    planes = pack_lut(codes, bits)
    assert planes.numel() * 8 == codes.numel() * bits
    assert torch.equal(unpack_lut(planes, bits), codes)
    rows = torch.tensor([31, 0, 17])
    assert torch.equal(unpack_lut(planes, bits, rows), codes[rows])


def test_lookup_layout_puts_each_bit_where_the_kernel_reads_it():
    """Bit i of row 16T + r at input 16j + s + 4t is bit t of the nibble at position 4r + s (csrc/lut.h)."""
    codes = torch.zeros(32, 64, dtype=torch.uint8)
    codes[16 + 5, 16 * 2 + 3 + 4 * 2] = 0b100  # tile 1, r 5, block 2, s 3, t 2; bit 2
    planes = pack_lut(codes, 3)
    position = 4 * 5 + 3  # < 32: the low nibble of byte 23
    assert planes[2, 1, 2, position].item() == 1 << 2
    assert planes.count_nonzero().item() == 1


def test_int4_layout_unpacks_exact_codes():
    qw = quantize(torch.randn(192, 128), 4, 64)
    pack = Int4Packed(qw, torch.bfloat16)
    ids = torch.tensor([0, 31, 32, 63, 64, 191])
    assert torch.equal(pack._codes(ids), qw.codes[ids])


def exact_quantized(bits: int, group: int, out_features: int = 128, in_features: int = 128) -> QuantizedWeight:
    """Codes, power-of-two scales and integer zero-points: every dequantized value is exact in bf16."""
    generator = torch.Generator().manual_seed(bits)
    groups = 1 if group == -1 else -(-in_features // group)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scale = 2.0 ** -torch.randint(3, 9, (out_features, groups), generator=generator).float()
    zero = torch.randint(0, 2**bits, (out_features, groups), generator=generator).float()
    return QuantizedWeight(codes, scale, zero, bits, group)


@pytest.mark.parametrize(("fmt", "bits", "group"), [
    (Int4Packed, 4, 64), (Int4Packed, 4, 32), (Int8Channel, 8, -1),
    (BitPlanes, 3, 64), (BitPlanes, 5, 64), (BitPlanes, 7, 128), (BitPlanes, 8, -1),
])
@pytest.mark.parametrize("in_features", [128, 192])
def test_zero_point_mapping_is_exact(fmt, bits, group, in_features):
    # One-hot activations read the kernel's weight back: (c - 8) * s + (8 - z) * s must equal (c - z) * s.
    qw = exact_quantized(bits, group, in_features=in_features)
    if not fmt.supports(qw, torch.device("cpu")):
        pytest.skip(f"{fmt.__name__} does not hold {bits}-bit weights with group {group} over {in_features} inputs")
    pack = fmt(qw, torch.bfloat16)
    read_back = pack.linear(torch.eye(in_features, dtype=torch.bfloat16))
    assert torch.equal(read_back.float(), qw.dequantize().T)


def test_a_grid_the_packs_cannot_hold_exactly_takes_another_format():
    """Packs store float16 scales and uint8 zero-points; a group whose weights are all positive has a
    zero-point below 0, so the weight is served by a format that holds it exactly, not rounded into one."""
    weight = torch.randn(80, 320, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[3, :64] = weight[3, :64].abs() + 0.01
    qw = quantize(weight, 4, 64)
    assert qw.zero.min() < 0 and torch.equal(qw.scale.half().float(), qw.scale)
    cpu = torch.device("cpu")
    assert not BitPlanes.supports(qw, cpu) and not LutPlanes.supports(qw, cpu)
    with pytest.raises(ValueError, match="zero-points"):
        BitPlanes(qw, torch.bfloat16)
    pack = pack_weight(qw, torch.bfloat16)
    assert not isinstance(pack, (BitPlanes, LutPlanes))
    assert relative_error(pack.dense(), qw.dequantize()) < 0.01
    # The choice is this weight's, not its shape's: the next weight of the shape packs as usual.
    usual = quantize(torch.randn(80, 320, generator=torch.Generator().manual_seed(1)) * 0.05, 4, 64)
    assert isinstance(pack_weight(usual, torch.bfloat16), (BitPlanes, LutPlanes))


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_bit_planes_cost_no_more_than_their_bits(bits):
    qw = quantize(torch.randn(256, 256), bits, 64)
    # b bits per weight, plus a float16 scale and a uint8 zero-point per group: what the grid counts.
    assert BitPlanes(qw, torch.bfloat16).nbytes == 256 * 256 * storage_bits_per_weight(bits, 64, 256) / 8


@pytest.mark.parametrize(("bits", "group"), [(3, 64), (5, 64), (7, 128), (8, -1)])
def test_bit_planes_without_native_kernels_dequantize_in_pytorch(bits, group):
    """The path CUDA and machines without a compiler take: the tiled planes unpacked by PyTorch ops."""
    qw = quantize(torch.randn(64, 192) * 0.05, bits, group)
    pack = BitPlanes(qw, torch.bfloat16)
    pack._native = pack._native_dequant = None
    reference = qw.dequantize()
    assert torch.equal(pack.dense(), reference.bfloat16())
    ids = torch.tensor([[0, 63], [17, 5]])
    assert torch.equal(pack.rows(ids), reference[ids].bfloat16())
    x = torch.randn(3, 192).bfloat16()
    assert relative_error(pack.linear(x), x.float() @ reference.T) < 0.01
