"""Activation-aware equalization on a tiny random LLaMA: the float block is unchanged, quantization error
falls, and the scales come back with the artifact and with a resumed calibration."""

import pytest
import torch

from quept_core.calibration.clip_search import input_grams
from quept_core.calibration.equalize import SCALED_PAIRS, alphas, equalize_block
from quept_core.calibration.loop import block_inputs
from quept_core.config import BitConfig
from quept_core.quant.elastic import make_elastic, set_bits
from tests.unit.tiny_llama import tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")

BITS = (3, 4)


def _block_with_outliers():
    """Block 0 of a tiny model whose inputs carry a few large channels, as real LLM activations do."""
    model = tiny_loaded().model
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.input_layernorm.weight[[3, 70]] *= 25.0
        layer.post_attention_layernorm.weight[[11, 90]] *= 25.0
        layer.mlp.up_proj.weight[[5, 200]] *= 25.0
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    x, block_kwargs = block_inputs(model, tokens)
    elastic = make_elastic(model, BitConfig())
    prefix = "model.layers.0."
    linears = {name.removeprefix(prefix): m for name, m in elastic.items() if name.startswith(prefix)}
    return model.model.layers[0], linears, x, block_kwargs


def _outputs(block, x, block_kwargs, bits):
    set_bits(block, bits)
    with torch.no_grad():
        out = block(x, **block_kwargs)
    set_bits(block, None)
    return out


def test_equalization_keeps_the_float_block_and_lowers_its_quantization_error():
    block, linears, x, block_kwargs = _block_with_outliers()
    reference = _outputs(block, x, block_kwargs, None)
    before = {b: (_outputs(block, x, block_kwargs, b) - reference).abs().mean().item() for b in BITS}
    grams = dict(zip(linears, input_grams(block, list(linears.values()), [x], block_kwargs), strict=True))

    equalize_block(block, linears, grams, BITS, alphas(20))

    torch.testing.assert_close(_outputs(block, x, block_kwargs, None), reference, rtol=1e-4, atol=1e-4)
    after = {b: (_outputs(block, x, block_kwargs, b) - reference).abs().mean().item() for b in BITS}
    assert all(after[b] < 0.9 * before[b] for b in BITS), (before, after)
    for pair in SCALED_PAIRS:
        scales = [linears[path].input_scale for path in pair.consumers]
        assert not torch.equal(scales[0], torch.ones_like(scales[0])), pair.producer
        assert all(torch.equal(scale, scales[0]) for scale in scales)


def test_the_grams_follow_the_scaled_inputs():
    block, linears, x, block_kwargs = _block_with_outliers()
    grams = dict(zip(linears, input_grams(block, list(linears.values()), [x], block_kwargs), strict=True))
    equalize_block(block, linears, grams, BITS, alphas(20))
    measured = input_grams(block, list(linears.values()), [x], block_kwargs)
    for path, gram in zip(linears, measured, strict=True):
        torch.testing.assert_close(grams[path], gram, rtol=1e-3, atol=1e-2 * gram.abs().max().item())


def test_a_grid_of_one_leaves_the_block_alone():
    block, linears, x, block_kwargs = _block_with_outliers()
    weights = {path: m.weight.clone() for path, m in linears.items()}
    grams = dict(zip(linears, input_grams(block, list(linears.values()), [x], block_kwargs), strict=True))
    equalize_block(block, linears, grams, BITS, alphas(1))
    assert all(torch.equal(linears[path].weight, weight) for path, weight in weights.items())


def test_grid_sizes_outside_the_range_are_refused():
    with pytest.raises(ValueError, match="equalization grid size"):
        alphas(0)
    with pytest.raises(ValueError, match="equalization grid size"):
        alphas(21)
