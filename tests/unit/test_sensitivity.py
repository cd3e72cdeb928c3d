"""Per-layer sensitivity on a tiny random model: the proxy's maths, the KL probe, rank correlation."""

import numpy as np
import pytest
import torch
from tiny_lm import tiny_model

from quept_core.config import BitConfig
from quept_core.layers import model_linear_names
from quept_core.planning.sensitivity import (
    KLProbe,
    kl_sensitivity,
    proxy_sensitivity,
    rank_correlation,
    relative_errors,
)
from quept_core.quant.blockwise import input_basis
from quept_core.quant.sources import RtnWeights, float_weights

BIT_CONFIG = BitConfig()


def setup(seed: int = 0):
    model = tiny_model(seed)
    source = RtnWeights(float_weights(model, model_linear_names(model)), BIT_CONFIG)
    tokens = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(seed))
    return model, source, tokens


def test_relative_error_matches_the_definition_on_recorded_inputs():
    model, source, tokens = setup()
    name = "model.layers.1.mlp.down_proj"
    linear = model.get_submodule(name)
    recorded = []
    handle = linear.register_forward_hook(lambda _m, args, _o: recorded.append(args[0].reshape(-1, 128)))
    with torch.inference_mode():
        model(tokens)
    handle.remove()
    x = torch.cat(recorded)
    weight = linear.weight
    expected = [float((x @ (source.quantized(name, b).dequantize() - weight).T).square().sum()
                      / (x @ weight.T).square().sum()) for b in BIT_CONFIG.bits]
    errors = relative_errors(model, source, tokens, BIT_CONFIG.bits)
    row = model_linear_names(model).index(name)
    assert errors[row] == pytest.approx(expected, rel=1e-4)
    assert all(a > b for a, b in zip(errors[row], errors[row][1:], strict=False))  # more bits, less error


def test_input_basis_preserves_the_gram_matrix():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(0))
    for batches in ([x], [x[:10]]):
        basis = input_basis(batches)
        full = torch.cat(batches)
        assert basis.shape[0] <= max(24, full.shape[0]) and basis.shape[0] <= full.shape[0]
        assert torch.allclose(basis.T @ basis, full.T @ full, rtol=1e-4, atol=1e-3)


def test_kl_probe_is_zero_without_quantization_and_positive_with_it():
    model, source, tokens = setup()
    probe = KLProbe(model, tokens[:2, :16])
    assert probe.kl(0, {}) == pytest.approx(0.0, abs=1e-6)
    name = "model.layers.0.mlp.up_proj"
    assert probe.kl(0, {name: source.quantized(name, 3).dequantize()}) > 0


def test_proxy_block_sums_at_the_lowest_bit_equal_the_block_kl():
    model, source, tokens = setup()
    table = proxy_sensitivity(model, source, BIT_CONFIG, tokens, tokens[:2, :16])
    assert table.values.shape == (14, len(BIT_CONFIG.bits)) and len(table.block_factors) == 2
    probe = KLProbe(model, tokens[:2, :16])
    for block in range(2):
        names = model_linear_names(model)[block * 7 : (block + 1) * 7]
        block_kl = probe.kl(block, {n: source.quantized(n, 3).dequantize() for n in names})
        assert table.values[block * 7 : (block + 1) * 7, 0].sum() == pytest.approx(block_kl, rel=1e-5)


def test_kl_table_has_one_probe_per_layer_and_bit():
    model, source, tokens = setup()
    table = kl_sensitivity(model, source, BIT_CONFIG, tokens[:2, :16])
    assert table.kind == "kl" and table.values.shape == (14, len(BIT_CONFIG.bits))
    assert (table.values >= -1e-7).all()
    # Three bits lose more than eight, layer by layer, on average.
    assert table.values[:, 0].mean() > table.values[:, -1].mean()


def test_rank_correlation():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a * 10) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(np.array([1.0, 1.0, 2.0]), np.array([5.0, 5.0, 9.0])) == pytest.approx(1.0)
    assert rank_correlation(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
