"""The clip-ratio search: the symmetric grid, and the one-side-at-a-time refinement at the low widths."""

import pytest
import torch

from quept_core.calibration.clip_search import (
    best_clip_logits,
    clip_ratios,
    diagonal_blocks,
    group_errors,
    init_clips,
    ratio_to_logit,
)
from quept_core.calibration.loop import CalibrationConfig
from quept_core.config import BitConfig
from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = 64


def _skewed_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [32, 128] whose groups each have one large positive outlier, and a Gram of real inputs."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(32, 128, generator=generator) * 0.02
    weight[torch.arange(32), torch.randint(0, 128, (32,), generator=generator)] += 0.12
    x = torch.randn(512, 128, generator=generator) * torch.linspace(0.5, 3.0, 128)
    return weight, x.T @ x


def _errors(weight, gram, bits, up, low):
    delta = fake_quantize(weight, bits, GROUP, up, low) - weight
    return group_errors(delta, diagonal_blocks(gram, GROUP), GROUP)


def test_group_errors_equal_the_output_error_of_each_group():
    weight, gram = _skewed_layer()
    delta = torch.randn_like(weight)
    errors = group_errors(delta, diagonal_blocks(gram, GROUP), GROUP)
    for g in range(128 // GROUP):
        part = slice(g * GROUP, (g + 1) * GROUP)
        expected = ((delta[:, part] @ gram[part, part]) * delta[:, part]).sum(-1)
        torch.testing.assert_close(errors[:, g], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_refining_each_side_never_raises_a_groups_error_and_lowers_the_total(bits):
    weight, gram = _skewed_layer()
    ratios = clip_ratios(20)
    up_sym, low_sym = best_clip_logits(weight, gram, bits, GROUP, ratios)
    up, low = best_clip_logits(weight, gram, bits, GROUP, ratios, asymmetric=True)

    assert torch.equal(up_sym, low_sym)
    symmetric, refined = _errors(weight, gram, bits, up_sym, low_sym), _errors(weight, gram, bits, up, low)
    assert (refined <= symmetric * (1 + 1e-5)).all()
    assert refined.sum() < 0.99 * symmetric.sum(), (refined.sum(), symmetric.sum())
    assert not torch.equal(up, low)  # the outlier side is clipped harder than the other


def test_the_symmetric_search_picks_the_least_error_ratio_of_the_grid():
    weight, gram = _skewed_layer(1)
    ratios = clip_ratios(8)
    up, low = best_clip_logits(weight, gram, 3, GROUP, ratios)
    chosen = _errors(weight, gram, 3, up, low)
    for ratio in ratios:
        logit = torch.full_like(up, ratio_to_logit(ratio))
        assert (chosen <= _errors(weight, gram, 3, logit, logit) * (1 + 1e-5)).all()


def test_init_clips_refines_only_the_named_widths():
    weight, gram = _skewed_layer()
    linear = ElasticLinear(torch.nn.Linear(128, 32, bias=False), BitConfig(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        linear.weight.copy_(weight)
    init_clips([linear], [gram], (3, 4, 8), clip_ratios(20), asymmetric_bits=(3,))
    assert not torch.equal(linear.clip_up["3"], linear.clip_low["3"])
    assert torch.equal(linear.clip_up["4"], linear.clip_low["4"])
    assert torch.equal(linear.clip_up["8"], linear.clip_low["8"])


def test_the_config_refines_the_two_lowest_tiers_unless_told_otherwise():
    assert CalibrationConfig().clip_refine_bits == (3, 4)
    assert CalibrationConfig(asymmetric_clip_bits=()).clip_refine_bits == ()
    assert CalibrationConfig(asymmetric_clip_bits=(3, 5)).clip_refine_bits == (3, 5)
    with pytest.raises(ValueError, match="asymmetric_clip_bits"):
        CalibrationConfig(asymmetric_clip_bits=(2,))
