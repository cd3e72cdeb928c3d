"""GPTQ against round-to-nearest on toy layers, and block-by-block on a tiny model."""

import pytest
import torch
from tiny_lm import tiny_model

from quept_core.config import BitConfig
from quept_core.eval.baselines.gptq import gptq_model, gptq_quantize
from quept_core.layers import model_linear_names
from quept_core.quant.grid import quantize


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    scales = torch.logspace(-1, 1, features)
    return (torch.randn(tokens, features, generator=generator) * scales) @ mixing + 0.3


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((x @ (approx - weight).T).square().sum())


@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(3, 32, False), (4, 32, True), (4, -1, False),
                                                               (3, -1, True)])
def test_gptq_beats_rtn_on_the_calibration_inputs(bits, group_size, act_order):
    x = correlated_inputs(512, 96)
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    rtn = quantize(weight, bits, group_size).dequantize()
    gptq = gptq_quantize(weight, x.T @ x, bits, group_size, act_order=act_order)
    assert output_error(x, weight, gptq.dequantize()) < 0.8 * output_error(x, weight, rtn)


def test_gptq_codes_are_on_the_quantizer_grid():
    x = correlated_inputs(256, 64)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    result = gptq_quantize(weight, x.T @ x, 4, 32)
    assert result.codes.dtype == torch.uint8 and int(result.codes.max()) <= 15
    assert result.scale.shape == (16, 2) and result.zero.shape == (16, 2)
    assert torch.equal(result.zero, result.zero.round())


def test_uncorrelated_inputs_make_gptq_plain_rounding():
    # With H = I the inverse Hessian is diagonal: no error is propagated, so GPTQ rounds like RTN.
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for group_size in (32, -1):
        gptq = gptq_quantize(weight, torch.eye(64), 3, group_size)
        assert torch.equal(gptq.codes, quantize(weight, 3, group_size).codes)


def test_gptq_model_quantizes_every_linear_without_touching_the_model():
    model = tiny_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    result = gptq_model(model, tokens, 4, BitConfig())
    assert sorted(result) == sorted(model_linear_names(model))
    for name, qweight in result.items():
        assert qweight.bits == 4
        assert qweight.dequantize().shape == model.get_submodule(name).weight.shape
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
