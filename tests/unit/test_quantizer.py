"""The quantizer's maths on tiny inputs: grid round-trip, half-step error, clipping, STE gradients."""

import pytest
import torch

from quept_core.quant.grid import (
    fake_quantize,
    fake_quantize_groups,
    fake_quantize_groups_into,
    grouped_weight,
    init_clip_logits,
    num_groups,
    quantize,
    storage_bits_per_weight,
)


def _on_grid(out_features: int, in_features: int, bits: int, group: int, seed: int = 0) -> torch.Tensor:
    """A weight that lies exactly on a b-bit grid (float16 scales, as the grid's), each group using both
    ends of the code range."""
    generator = torch.Generator().manual_seed(seed)
    width = in_features if group == -1 else group
    groups = num_groups(in_features, group)
    top = 2**bits - 1
    codes = torch.randint(0, top + 1, (out_features, groups, width), generator=generator).float()
    codes[:, :, 0], codes[:, :, 1] = 0, top
    zero = torch.randint(1, top, (out_features, groups, 1), generator=generator).float()
    scale = (torch.rand(out_features, groups, 1, generator=generator) * 0.01 + 0.001).half().float()
    return ((codes - zero) * scale).reshape(out_features, -1)[:, :in_features]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [16, -1])
def test_weight_on_the_grid_round_trips_exactly(bits, group):
    weight = _on_grid(6, 48, bits, group)
    packed = quantize(weight, bits, group)
    assert packed.codes.dtype == torch.uint8
    assert int(packed.codes.min()) == 0 and int(packed.codes.max()) == 2**bits - 1
    torch.testing.assert_close(packed.dequantize(), weight, rtol=1e-6, atol=1e-6)
    again = quantize(packed.dequantize(), bits, group)
    assert torch.equal(again.codes, packed.codes)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group,in_features", [(16, 48), (16, 40), (-1, 40)])  # 40: the last group is padded
def test_integer_form_equals_fake_quantization(bits, group, in_features):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(5, in_features, generator=generator)
    up = torch.rand(5, num_groups(in_features, group), generator=generator) * 4
    low = torch.rand(5, num_groups(in_features, group), generator=generator) * 4
    packed = quantize(weight, bits, group, up, low)
    assert packed.codes.shape == (5, in_features)
    assert packed.scale.shape == (5, num_groups(in_features, group))
    assert torch.equal(packed.dequantize(), fake_quantize(weight, bits, group, up, low))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [16, -1])
@pytest.mark.parametrize("clipped", [True, False])
def test_fake_quantization_in_place_gives_the_same_numbers(bits, group, clipped):
    generator = torch.Generator().manual_seed(bits)
    groups = grouped_weight(torch.randn(7, 48, generator=generator), group).transpose(0, 1).contiguous()
    up, low = (torch.rand(groups.shape[:2], generator=generator) * 6 - 1 if clipped else None for _ in range(2))
    expected = fake_quantize_groups(groups, bits, up, low)
    out = torch.full_like(groups, float("nan"))
    quantized = fake_quantize_groups_into(out, groups, bits, groups.amax(-1), groups.amin(-1), up, low)
    assert quantized.data_ptr() == out.data_ptr()
    assert torch.equal(quantized, expected)
    assert torch.equal(fake_quantize_groups_into(groups, groups, bits, groups.amax(-1), groups.amin(-1), up, low),
                       expected)  # in place over the weight itself


@pytest.mark.parametrize("group", [16, -1])
def test_8_bit_error_is_at_most_half_a_step_inside_the_clip_range(group):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 64, generator=generator)
    groups = num_groups(64, group)
    up = torch.rand(8, groups, generator=generator) * 3 + 1  # clip ratios between 0.73 and 0.98
    low = torch.rand(8, groups, generator=generator) * 3 + 1
    packed = quantize(weight, 8, group, up, low)
    width = 64 if group == -1 else group
    grouped = weight.reshape(8, groups, width)
    upper = (torch.sigmoid(up) * grouped.amax(-1)).unsqueeze(-1)
    lower = (torch.sigmoid(low) * grouped.amin(-1)).unsqueeze(-1)
    inside = (grouped >= lower) & (grouped <= upper)
    error = (packed.dequantize().reshape(8, groups, width) - grouped).abs()
    half_step = packed.scale.unsqueeze(-1) / 2
    assert inside.float().mean() > 0.7
    assert bool((error <= half_step * (1 + 1e-5) + 1e-7)[inside].all())
    assert bool((error > half_step)[~inside].any()), "clipped weights must lie outside the grid"


def test_clip_logits_shrink_the_range():
    weight = torch.linspace(-1, 1, 32).reshape(1, 32)
    loose = fake_quantize(weight, 4, -1, torch.full((1, 1), 20.0), torch.full((1, 1), 20.0))
    tight = fake_quantize(weight, 4, -1, torch.zeros(1, 1), torch.zeros(1, 1))  # sigmoid(0) = 0.5
    # The integer zero-point may shift the grid by up to one step (2/15 loose, 1/15 tight).
    assert loose.abs().max() > 1 - 2 / 15 - 1e-6
    assert tight.abs().max() <= 0.5 + 1 / 15 + 1e-6
    assert (tight - weight).abs().max() > 0.4


def test_gradients_pass_straight_through_and_reach_the_clip_logits():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 32, generator=generator, requires_grad=True)
    up = init_clip_logits(4, 32, 16).requires_grad_()
    low = init_clip_logits(4, 32, 16).requires_grad_()
    fake_quantize(weight, 3, 16, up, low).sum().backward()
    grouped = weight.detach().reshape(4, 2, 16)
    clipped = (grouped > torch.sigmoid(up.detach()).unsqueeze(-1) * grouped.amax(-1, keepdim=True)) | (
        grouped < torch.sigmoid(low.detach()).unsqueeze(-1) * grouped.amin(-1, keepdim=True))
    interior = ~clipped.reshape(4, 32)
    interior[weight.detach() == weight.detach().amax(-1, keepdim=True)] = False  # extremes also feed the scale
    interior[weight.detach() == weight.detach().amin(-1, keepdim=True)] = False
    # Inside the range the rounding is straight-through; only the extreme elements see scale gradients.
    assert torch.allclose(weight.grad[interior], torch.ones_like(weight.grad[interior]))
    assert up.grad is not None and up.grad.abs().sum() > 0
    assert low.grad is not None and low.grad.abs().sum() > 0


def _reference_fake_quantize(weight, bits, group, up, low):
    """The quantizer's formulas composed from autograd primitives (straight-through round, clamp and
    rounding of the scale to float16)."""
    grouped = weight.reshape(weight.shape[0], -1, weight.shape[1] if group == -1 else group)
    high = torch.sigmoid(up) * grouped.amax(-1)
    lowest = torch.sigmoid(low) * grouped.amin(-1)
    raw = (high - lowest) / (2**bits - 1)
    scale = ((raw.clamp(1e-5, 1e4).half().to(raw.dtype) - raw).detach() + raw).unsqueeze(-1)
    zero = (-lowest.unsqueeze(-1) / scale).round().detach()
    steps = grouped / scale
    codes = ((steps.round() - steps).detach() + steps + zero).clamp(0, 2**bits - 1)
    return ((codes - zero) * scale).reshape(weight.shape)


@pytest.mark.parametrize("bits,group", [(3, 16), (4, 16), (8, -1), (6, 32)])
def test_fused_gradients_match_autograd_through_the_formulas(bits, group):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(6, 64, generator=generator, dtype=torch.float64)
    weight[0, :16] = weight[0, 0]  # tied extremes share their gradient
    groups = num_groups(64, group)
    up = (torch.rand(6, groups, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    low = (torch.rand(6, groups, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    upstream = torch.randn(6, 64, generator=generator, dtype=torch.float64)
    results = []
    for function in (fake_quantize, _reference_fake_quantize):
        leaf = weight.clone().requires_grad_()
        out = function(leaf, bits, group, up, low)
        grads = torch.autograd.grad((out * upstream).sum(), (leaf, up, low))
        results.append((out, *grads))
    for fused, reference in zip(*results, strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-12)


def test_storage_bits_count_scale_and_zero_per_group():
    assert storage_bits_per_weight(4, 64, 576) == pytest.approx(4 + 24 / 64)
    assert storage_bits_per_weight(8, -1, 576) == pytest.approx(8 + 24 / 576)
