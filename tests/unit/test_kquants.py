"""llama.cpp's k-quants of a float model, scored in llama.cpp on the windows our perplexity uses."""

import math

import pytest
import torch
from tiny_gguf import tiny_gguf_model, write_tiny_gguf

from quept_core.eval.baselines.kquants import (
    FLOAT_METHOD,
    KQuantFiles,
    block_linear_bits,
    llamacpp_window_nll,
)
from quept_core.eval.perplexity import window_nll

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kquants")
    model = tiny_gguf_model()
    return model, KQuantFiles(write_tiny_gguf(model, folder / "tiny.gguf"), folder / "derived")


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0))


def test_llamacpp_on_the_float_gguf_scores_like_our_perplexity(files, windows):
    model, kquants = files
    ours = window_nll(model, windows)
    theirs = llamacpp_window_nll(kquants.path(FLOAT_METHOD), windows)
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)
    assert block_linear_bits(kquants.path(FLOAT_METHOD)).bits_per_weight == 32


@pytest.mark.parametrize(("method", "low", "high", "kinds"), [
    ("llamacpp-q8_0", 8.5, 8.5, {"q8_0"}),
    ("llamacpp-q4_k_m", 4.5, 6.5625, {"q4_k", "q6_k"}),
    ("llamacpp-q3_k_s", 3.4375, 3.4375, {"q3_k"}),
])
def test_kquant_files_have_their_types_and_finite_perplexity(files, windows, method, low, high, kinds):
    model, kquants = files
    path = kquants.path(method)
    bits = block_linear_bits(path)
    assert set(bits.types) == kinds and sum(bits.types.values()) == 7 * 2
    assert low <= bits.bits_per_weight <= high
    nll = llamacpp_window_nll(path, windows)
    fp = window_nll(model, windows)
    assert all(math.isfinite(v) for v in nll.tolist())
    assert not torch.allclose(nll, fp, rtol=1e-4)  # the weights did change
