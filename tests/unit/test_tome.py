"""MB-ToMe: exactly floor(p N) tokens keep the high-bit output, the rest take the λ-mix."""

import pytest
import torch

from quept_core.calibration.tome import default_tome_weights, keep_mask, merge_tiers


@pytest.mark.parametrize("tokens,ratio", [(8, 0.5), (7, 0.5), (5, 0.25), (9, 1.0), (6, 0.0)])
def test_keeps_exactly_floor_p_n_tokens_per_sequence(tokens, ratio):
    similarity = torch.randn(3, tokens)
    mask = keep_mask(similarity, ratio)
    assert mask.sum(dim=1).tolist() == [int(ratio * tokens)] * 3


def test_the_kept_tokens_are_the_most_similar_and_take_the_high_output():
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(2, 6, 4, generator=generator)
    mid = torch.randn(2, 6, 4, generator=generator)
    high = torch.randn(2, 6, 4, generator=generator)
    weights = (0.4, 0.3, 0.3)
    merged = merge_tiers([low, mid, high], weights, ratio=0.5)
    similarity = torch.nn.functional.cosine_similarity(low, high, dim=-1)
    mixed = 0.4 * low + 0.3 * mid + 0.3 * high
    for seq in range(2):
        top = set(similarity[seq].argsort(descending=True)[:3].tolist())
        for token in range(6):
            expected = high[seq, token] if token in top else mixed[seq, token]
            torch.testing.assert_close(merged[seq, token], expected)


def test_identical_tiers_pass_through_unchanged():
    x = torch.randn(1, 5, 3)
    torch.testing.assert_close(merge_tiers([x, x, x, x], default_tome_weights(4)), x)


def test_default_weights_follow_the_reference():
    assert default_tome_weights(3) == (0.4, 0.3, 0.3)
    assert default_tome_weights(4) == (0.25, 0.25, 0.25, 0.25)
    assert sum(default_tome_weights(5)) == pytest.approx(1.0)


def test_bad_arguments_are_named():
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="2 tier outputs but 3 weights"):
        merge_tiers([x, x], (0.3, 0.3, 0.4))
    with pytest.raises(ValueError, match="ratio must be in"):
        merge_tiers([x, x], (0.5, 0.5), ratio=1.5)
