"""Weight sources and materialized plans give the same outputs as on-the-fly fake quantization."""

import torch
from tiny_lm import tiny_model

from quept_core.config import BitConfig
from quept_core.layers import model_linear_names
from quept_core.planning.plan import uniform_plan
from quept_core.quant.elastic import ElasticLinear, make_elastic, set_bits
from quept_core.quant.sources import QueptWeights, RtnWeights, dequantized_weights, float_weights, use_weights

BIT_CONFIG = BitConfig()
TOKENS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))


def calibrated_like(seed: int = 0):
    """Elastic linears with a non-zero LoRA and varied clip logits, as after calibration."""
    model = tiny_model(seed)
    elastic = make_elastic(model, BIT_CONFIG, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for linear in elastic.values():
            linear.lora_B.normal_(0, 0.01, generator=generator)
            for logits in [*linear.clip_up.values(), *linear.clip_low.values()]:
                logits.uniform_(1.0, 5.0, generator=generator)
    return model, elastic


def test_materialized_plan_equals_fake_quant_forward():
    model, elastic = calibrated_like()
    names = model_linear_names(model)
    source = QueptWeights(elastic)
    for bits in (3, 5, 8):
        set_bits(model, bits)
        with torch.no_grad():
            expected = model(TOKENS).logits
        set_bits(model, None)
        with torch.no_grad(), use_weights(model, dequantized_weights(source, uniform_plan(names, bits).layer_bits)):
            got = model(TOKENS).logits
        assert torch.allclose(got, expected, atol=1e-5)


def test_mixed_plan_uses_each_layers_bits_and_restores_the_model():
    model, elastic = calibrated_like()
    names = model_linear_names(model)
    layer_bits = {name: (3 if i % 2 else 8) for i, name in enumerate(names)}
    layer_bits[names[0]] = None  # full precision
    for name, bits in layer_bits.items():
        elastic[name].bits = bits
    with torch.no_grad():
        expected = model(TOKENS).logits
    set_bits(model, None)
    weights = dequantized_weights(QueptWeights(elastic), layer_bits)
    assert names[0] not in weights
    with torch.no_grad(), use_weights(model, weights):
        got = model(TOKENS).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(isinstance(model.get_submodule(n), ElasticLinear) for n in names)


def test_rtn_is_unclipped_round_to_nearest():
    model = tiny_model()
    name = "model.layers.0.self_attn.q_proj"
    weight = model.get_submodule(name).weight
    rtn = RtnWeights(float_weights(model, [name]), BIT_CONFIG).quantized(name, 4)
    assert rtn.group_size == BIT_CONFIG.group_size_for(4)
    # No clipping: every group's extremes land on the end codes and every weight within half a step,
    # give or take what rounding the scale to float16 moves (relative 2^-11, times at most 15 codes).
    codes = rtn.codes.reshape(weight.shape[0], -1, rtn.group_size).int()
    assert (codes.amin(-1) <= 1).all() and (codes.amax(-1) >= 14).all()
    step = rtn.scale.repeat_interleave(rtn.group_size, dim=1)
    assert ((rtn.dequantize() - weight).abs() <= step * (0.5 + 15 * 2**-11) + 1e-6).all()
