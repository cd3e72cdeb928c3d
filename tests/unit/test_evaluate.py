"""Perplexity by the project convention on a tiny random model."""

import math

import pytest
import torch
from tiny_lm import tiny_model, tiny_tokenizer

from quept_core.eval.perplexity import EvaluationError, make_windows, perplexity, read_text, tokenize_text


def test_perplexity_is_exp_of_mean_token_nll_from_the_model_loss():
    model = tiny_model()
    windows = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        # Every window has the same number of targets, so the mean of window losses is the token mean.
        losses = [float(model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss) for w in windows]
    result = perplexity(model, windows, batch_size=2)
    assert result.predicted_tokens == 5 * 23
    assert result.mean_nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_batching_does_not_change_perplexity():
    model = tiny_model()
    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(2))
    assert perplexity(model, windows, batch_size=1).ppl == pytest.approx(perplexity(model, windows, 4).ppl, rel=1e-6)


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(103)
    windows = make_windows(ids, 10)
    assert windows.shape == (10, 10)
    assert torch.equal(windows.reshape(-1), torch.arange(100))


def test_max_tokens_cuts_before_windowing():
    windows = make_windows(torch.arange(103), 10, max_tokens=35)
    assert torch.equal(windows.reshape(-1), torch.arange(30))


@pytest.mark.parametrize(("seqlen", "max_tokens", "message"), [
    (200, None, r"--seqlen 200 is larger than the text \(103 tokens\)"),
    (1, None, "--seqlen must be at least 2"),
    (10, 5, r"--max-tokens \(5\) must be at least --seqlen \(10\)"),
])
def test_window_errors_name_the_field(seqlen, max_tokens, message):
    with pytest.raises(EvaluationError, match=message):
        make_windows(torch.arange(103), seqlen, max_tokens)


def test_text_is_one_string_with_crlf_normalised(tmp_path):
    path = tmp_path / "text.raw"
    path.write_bytes(b"t1 t2\r\n\r\nt3\r\n")
    text = read_text(path)
    assert text == "t1 t2\n\nt3\n"
    assert tokenize_text(tiny_tokenizer(), text).tolist() == [1, 2, 3]


def test_missing_text_file_is_named(tmp_path):
    with pytest.raises(EvaluationError, match="--text: file not found"):
        read_text(tmp_path / "absent.txt")
