"""The native bit-plane kernel: the vectorized path (this CPU's) and the portable path (other CPUs)."""

import pytest
import torch

from quept_core.quant.grid import quantize
from quept_core.runtime.kernels.formats import PACK_REL_TOL, BitPlanes, Int4Packed, relative_error
from quept_core.runtime.kernels.native import planes_gemv


@pytest.fixture(scope="module")
def native():
    op = planes_gemv()
    if op is None:
        pytest.skip("no C++ toolchain")
    return op


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize(("rows", "in_features", "group"), [(1, 256, 64), (3, 192, 128), (21, 256, -1)])
# 80 outputs: 5 tiles, blocks cut short; 256: 16 tiles, whole blocks of 4 tiles per thread
@pytest.mark.parametrize("out_features", [80, 256])
@pytest.mark.parametrize("path", ["native", "portable"])
def test_kernel_matches_dequantized_reference(request, path, bits, rows, in_features, group, out_features):
    op = request.getfixturevalue(path)
    qw = quantize(torch.randn(out_features, in_features) * 0.05, bits, group)
    x = torch.randn(rows, in_features).bfloat16()
    pack = BitPlanes(qw, torch.bfloat16)
    out = op(x, pack.planes, bits, pack.scale, pack.zero, pack.group)
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    # The vectorized path quantizes activations to int8 per chunk of 64 (about 0.55 % on Gaussian rows).
    assert relative_error(out, x.float() @ qw.dequantize().T) < PACK_REL_TOL / 2


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize(("in_features", "group"), [(256, 64), (192, 128), (128, -1)])
@pytest.mark.parametrize("path", ["native", "portable"])
def test_dequantize_matches_reference(request, path, bits, in_features, group):
    ops = torch.ops.quept if path == "native" else torch.ops.quept_portable
    request.getfixturevalue(path)
    qw = quantize(torch.randn(48, in_features) * 0.05, bits, group)
    pack = BitPlanes(qw, torch.bfloat16)
    weight = ops.planes_dequant(pack.planes, bits, pack.scale, pack.zero, pack.group, in_features)
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, qw.dequantize().bfloat16())


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("path", ["native", "portable"])
def test_int4_dequantize_matches_the_kernel_formula(request, path, group):
    ops = torch.ops.quept if path == "native" else torch.ops.quept_portable
    request.getfixturevalue(path)
    pack = Int4Packed(quantize(torch.randn(192, 256) * 0.05, 4, group), torch.bfloat16)
    rows = torch.arange(192)
    expected = pack._dequant(pack._codes(rows), rows)  # (c - 8) * s + m from the unpacked layout
    assert torch.equal(ops.int4pack_dequant(pack.packed, pack.scale_zero, group), expected)
