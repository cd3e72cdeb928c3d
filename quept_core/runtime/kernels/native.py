"""The native CPU kernels (bit-plane matmul and dequantization, int4 dequantization, the whole decode
step), compiled once per torch version and CPU.

Building needs a C++ compiler (about 15 s, once; the result is cached under the QuEPT cache
folder); ninja comes with the package. Without a compiler, or with QUEPT_NATIVE=0, bit-plane weights
dequantize then multiply in PyTorch, which is correct but slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

from quept_core.io.paths import cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "planes.cpp", CSRC / "decode.cpp"]
# No -ffast-math: a row's arithmetic must not depend on which kernel tile it falls in (rows are
# bit-identical alone and batched); `omp simd` marks the reductions that may be vectorized. OpenMP
# itself: ATen's `parallel_for` is a header that runs its loop on one thread in code compiled
# without it; linked with it, the kernels share PyTorch's OpenMP runtime and thread count.
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
LIBRARY = "quept_planes"
BUILT = "built"  # marks a build folder whose library was compiled, linked and loaded once


def _cpu_key() -> str:
    """Identifies the instruction set the kernel is compiled for (-march=native)."""
    flags = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _source_key() -> str:
    """Changes with the flags and any kernel source, headers included (the JIT build tracks the listed sources only)."""
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def machine_key() -> str:
    """What compiled kernels and measurements made with them depend on: torch, the CPU, the kernels'
    source and flags, and whether they built here at all."""
    return f"torch-{torch.__version__}-{_cpu_key()}-{_source_key()}-native{int(_build())}-lut{int(_lut_built())}"


def decode_program_class() -> type | None:
    """`torch.classes.quept.DecodeProgram` (csrc/decode.cpp), or None without the kernels."""
    return torch.classes.quept.DecodeProgram if _build() else None


def planes_gemv() -> Callable | None:
    """`torch.ops.quept.planes_gemv(x, planes, bits, scale, zero, group)`, or None without the kernel."""
    return torch.ops.quept.planes_gemv.default if _build() else None


def planes_dequant() -> Callable | None:
    """`torch.ops.quept.planes_dequant(planes, bits, scale, zero, group, in_features)` -> bf16, or None."""
    return torch.ops.quept.planes_dequant.default if _build() else None


def lut_gemv() -> Callable | None:
    """`torch.ops.quept.lut_gemv(x, planes, bits, scale, zero, group)`, or None where the
    lookup-table kernels do not run (they need AVX-512 VBMI and VNNI)."""
    return torch.ops.quept.lut_gemv.default if _lut_built() else None


def lut_dequant() -> Callable | None:
    """`torch.ops.quept.lut_dequant(planes, bits, scale, zero, group, in_features)` -> bf16, or None."""
    return torch.ops.quept.lut_dequant.default if _lut_built() else None


def dense_gemv() -> Callable | None:
    """`torch.ops.quept.dense_gemv(x, weight)` -> float32, the fp plan's decode kernel (a bf16 weight,
    activations rounded to bf16), or None where it does not run (AVX-512 builds only, as the lookup
    tables)."""
    return torch.ops.quept.dense_gemv.default if _lut_built() else None


@cache
def _lut_built() -> bool:
    return _build() and torch.ops.quept.has_lut()


def int4pack_dequant() -> Callable | None:
    """`torch.ops.quept.int4pack_dequant(packed, scale_zero, group)` -> bf16 [n, k], or None."""
    return torch.ops.quept.int4pack_dequant.default if _build() else None


@cache
def _build() -> bool:
    """Compile and load the kernels once per process; False when they cannot be built."""
    if os.environ.get("QUEPT_NATIVE", "1") == "0":
        return False
    folder = cache_dir() / "kernels" / f"torch-{torch.__version__}-{_cpu_key()}-{_source_key()}"
    if not (_load_built(folder) or _compile(folder)):
        return False
    threads = torch.get_num_threads()
    if torch.ops.quept.parallel_threads(4 * threads) < threads:
        log.warning("the native kernels run their loops on fewer than the %d CPU threads", threads)
    return True


def _load_built(folder: Path) -> bool:
    """Load the library a build in `folder` made, if one finished there."""
    if not (folder / BUILT).is_file():
        return False
    try:
        torch.ops.load_library(str(folder / f"{LIBRARY}.so"))
    except OSError as error:  # removed or damaged since: build it again
        log.warning("rebuilding the native kernels: %s", error)
        (folder / BUILT).unlink(missing_ok=True)
        return False
    return True


def load_kernels(folder: Path, name: str = LIBRARY, csrc: Path = CSRC, cflags: Sequence[str] = CFLAGS,
                 ldflags: Sequence[str] = LDFLAGS) -> None:
    """Compile the kernel sources of `csrc` into `folder` and load them; raises when the build fails. A
    variant loaded next to the shipped kernels names its own operator namespace in `cflags`
    (`-DQUEPT_OPS=<namespace>`): the tests' portable build, another revision's in
    benchmarks/native_step_ab.py."""
    from torch.utils import cpp_extension

    # The `ninja` package installs its binary next to the interpreter, which may not be on PATH.
    scripts = Path(sys.executable).parent
    if shutil.which("ninja") is None and (scripts / "ninja").is_file():
        os.environ["PATH"] = f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(csrc / source.name) for source in SOURCES],
                       extra_include_paths=[str(csrc)], extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                       build_directory=str(folder), is_python_module=False, verbose=False)


def _compile(folder: Path) -> bool:
    """Compile, link and load the kernels into `folder` (the folder names the sources, flags, CPU and
    torch it was built for), then mark it built: a later process loads the library without the build
    tools, whose import (setuptools) holds 4 MiB for the life of a server."""
    try:
        load_kernels(folder)
    except (OSError, RuntimeError, ImportError, SystemExit) as error:
        log.warning("native bit-plane kernel unavailable (%s); using dequantize-then-matmul", error)
        return False
    (folder / BUILT).touch()  # after the load: the library is whole and loads
    return True
