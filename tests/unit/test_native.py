"""The native kernels: bit planes on the vectorized path (this CPU's) and the portable path (other CPUs),
and the dense bf16 kernel of the fp plan's decode step."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quept_core.quant.grid import quantize
from quept_core.runtime.kernels.formats import PACK_REL_TOL, BitPlanes, Int4Packed, relative_error
from quept_core.runtime.kernels.native import decode_program_class, dense_gemv, planes_gemv


def test_the_kernels_build_where_a_compiler_is_found():
    """A server without its kernels falls back to dequantize-then-matmul with a warning, and every test
    that needs them skips: so a kernel that no longer compiles must fail here, not pass as skipped tests."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH")
    assert planes_gemv() is not None and decode_program_class() is not None


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


@pytest.fixture(scope="module")
def dense():
    op = dense_gemv()
    if op is None:
        pytest.skip("the dense bf16 kernel needs an AVX-512 build")
    return op


# 40 and 100 inputs end in a partial vector of 32; 13 and 37 outputs split unevenly over the threads.
@pytest.mark.parametrize(("in_features", "out_features"), [(40, 13), (100, 37), (576, 64)])
# 17 rows: four blocks of 4 activation rows, then a block of 1.
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 17])
def test_dense_kernel_matches_a_bf16_matmul(dense, rows, in_features, out_features):
    weight = (torch.randn(out_features, in_features) * 0.05).bfloat16()
    x = torch.randn(rows, in_features)
    out = dense(x, weight)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    # The activations are rounded to bf16 as a bf16 matmul rounds them; only the order of the float32
    # sums differs.
    want = x.bfloat16().double() @ weight.double().T
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)


def test_dense_kernel_gives_a_row_the_same_bits_alone_and_among_others(dense):
    weight = (torch.randn(37, 100) * 0.05).bfloat16()
    x = torch.randn(17, 100)
    together = dense(x, weight)
    assert torch.equal(dense(x[:9], weight), together[:9])
    for row in range(17):
        assert torch.equal(dense(x[row : row + 1], weight)[0], together[row])


def test_kernels_run_their_loops_on_every_thread(native):
    """Built without OpenMP, ATen's parallel loop runs on one thread in the kernels, whatever the
    thread count: the decode step then leaves every other core idle."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one CPU thread here")
    assert torch.ops.quept.parallel_threads(64) == threads


def test_a_finished_build_loads_without_the_build_tools(native):
    """A later process loads the library the first one built, without importing torch's build tools."""
    script = ("import sys\nfrom quept_core.runtime.kernels import native\n"
              "assert native._build()\nprint('torch.utils.cpp_extension' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr
