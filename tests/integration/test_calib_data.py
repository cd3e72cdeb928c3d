"""Data-free calibration text: the model's own answers to the seed prompts, cached and reproducible."""

from __future__ import annotations

import pytest
import torch

from quept_core.calibration import data as calib_data
from quept_core.io.models import load_model
from tests.e2e.tiny_model import write_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer model with the default model's tokenizer and chat template: generation takes a moment."""
    return load_model(str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", layers=2)))


def test_generated_text_is_reproducible_and_only_as_long_as_needed(tiny, monkeypatch):
    calls = []
    generate = tiny.model.generate

    def counting_generate(**kwargs):
        calls.append(kwargs["max_new_tokens"])
        return generate(**kwargs)

    monkeypatch.setattr(tiny.model, "generate", counting_generate)
    first = calib_data._generate_stream(tiny, 100, seed=3, progress=False)
    second = calib_data._generate_stream(tiny, 100, seed=3, progress=False)
    assert first.shape == (100,) and torch.equal(first, second)
    assert calls[0] == 13  # ceil(100 / 8 answers), not the 512-token cap
    assert not torch.equal(first, calib_data._generate_stream(tiny, 100, seed=4, progress=False))


def test_generated_tokens_are_cached_per_model_seed_and_shape(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QUEPT_CACHE_DIR", str(tmp_path))
    tokens = calib_data.calibration_tokens(tiny, n_samples=2, seqlen=32, seed=0)
    assert tokens.shape == (2, 32)
    cached = list((tmp_path / "calib").glob("*.pt"))
    assert [p.name for p in cached] == [f"{tiny.checksum[:16]}-seed0-2x32.pt"]
    monkeypatch.setattr(calib_data, "_generate_stream", lambda *a: pytest.fail("regenerated a cached text"))
    assert torch.equal(calib_data.calibration_tokens(tiny, n_samples=2, seqlen=32, seed=0), tokens)
