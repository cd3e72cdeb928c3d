"""The elastic linear: zero LoRA is plain quantization, prefix slices cascade, state round-trips."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quept_core.config import BitConfig
from quept_core.quant.elastic import ElasticLinear, load_trainable_state, set_bits, trainable_state
from quept_core.quant.grid import fake_quantize

CONFIG = BitConfig(tiers=((3,), (4,), (5, 6), (7, 8)), tier_ranks=(12, 8, 6, 2),
                   group_sizes={3: 16, 4: 16, 5: 16, 6: 32, 7: -1, 8: -1})


def _elastic(seed: int = 0) -> ElasticLinear:
    torch.manual_seed(seed)
    return ElasticLinear(nn.Linear(48, 20, bias=True), CONFIG, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", CONFIG.bits)
def test_zero_initialised_lora_equals_plain_quantization(bits):
    linear = _elastic()
    group = CONFIG.group_size_for(bits)
    plain = fake_quantize(linear.weight, bits, group, linear.clip_up[str(bits)], linear.clip_low[str(bits)])
    assert torch.equal(linear.correction(bits), torch.zeros(20, 48))
    assert torch.equal(linear.fake_quant_weight(bits), plain)
    assert torch.equal(linear.materialize(bits), plain.detach())
    x = torch.randn(3, 48)
    linear.bits = bits
    torch.testing.assert_close(linear(x), F.linear(x, plain, linear.bias), rtol=0, atol=0)


def test_prefix_slices_have_the_tier_ranks_and_cascade():
    linear = _elastic()
    with torch.no_grad():
        linear.lora_B.normal_()
    assert linear.lora_B.shape == (20, 12) and linear.lora_A.shape == (12, 48)
    for bits in CONFIG.bits:
        rank = CONFIG.rank_for(bits)
        torch.testing.assert_close(linear.correction(bits), linear.lora_B[:, :rank] @ linear.lora_A[:rank])
    # Higher tiers use a prefix: changing ranks beyond a tier's slice leaves its correction alone.
    before = {b: linear.correction(b).clone() for b in CONFIG.bits}
    with torch.no_grad():
        linear.lora_B[:, 8:] += 1.0
    for bits in CONFIG.bits:
        changed = not torch.equal(linear.correction(bits), before[bits])
        assert changed == (CONFIG.rank_for(bits) > 8), bits
    # R_low = R_high + the extra ranks of the lower tier.
    extra = linear.lora_B[:, 2:6] @ linear.lora_A[2:6]
    torch.testing.assert_close(linear.correction(5), linear.correction(8) + extra)


def test_bits_in_one_tier_share_the_lora_slice_but_not_the_clips():
    linear = _elastic()
    with torch.no_grad():
        linear.lora_B.normal_()
        linear.clip_up["6"].fill_(1.0)
    assert torch.equal(linear.correction(5), linear.correction(6))
    assert not torch.equal(linear.clip_up["5"], linear.clip_up["6"])


def test_set_bits_switches_and_none_is_full_precision():
    block = nn.Sequential(_elastic(0), _elastic(1))
    set_bits(block, 3)
    assert [m.bits for m in block] == [3, 3]
    set_bits(block, None)
    x = torch.randn(2, 48)
    torch.testing.assert_close(block[0](x), F.linear(x, block[0].weight, block[0].bias))


def test_trainable_state_round_trips_and_checks_shapes():
    source, target = _elastic(0), _elastic(1)
    with torch.no_grad():
        source.lora_B.normal_()
        source.clip_low["3"].fill_(2.5)
    state = trainable_state({"lin": source})
    assert "lin.lora_A" in state and "lin.clip_up.8" in state and "lin.weight" not in state
    load_trainable_state({"lin": target}, state)
    for bits in CONFIG.bits:
        assert torch.equal(target.materialize(bits), fake_quantize(
            target.weight + source.correction(bits), bits, CONFIG.group_size_for(bits),
            source.clip_up[str(bits)], source.clip_low[str(bits)]).detach())
    with pytest.raises(KeyError, match="lacks"):
        load_trainable_state({"lin": target}, {k: v for k, v in state.items() if k != "lin.lora_B"})
    state["lin.lora_A"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="lin.lora_A: shape"):
        load_trainable_state({"lin": target}, state)


def test_a_tier_of_rank_zero_has_no_correction_and_keeps_its_own_clips():
    config = BitConfig(tier_ranks=(12, 8, 0, 0), group_sizes={3: 16, 4: 16, 5: 16, 6: 16, 7: -1, 8: -1})
    torch.manual_seed(0)
    linear = ElasticLinear(nn.Linear(48, 20), config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        linear.lora_B.normal_()
    assert linear.correction(4).abs().sum() > 0
    for bits in (5, 6, 7, 8):
        assert torch.equal(linear.correction(bits), torch.zeros(20, 48))
        plain = fake_quantize(linear.weight, bits, config.group_size_for(bits), linear.clip_up[str(bits)],
                              linear.clip_low[str(bits)])
        assert torch.equal(linear.fake_quant_weight(bits), plain)


@pytest.mark.parametrize("ranks", [(12, 8, 4, -1), (0, 0, 0, 0), (8, 12, 4, 2)])
def test_bad_tier_ranks_are_refused(ranks):
    with pytest.raises(ValueError, match="tier_ranks"):
        BitConfig(tier_ranks=ranks)
