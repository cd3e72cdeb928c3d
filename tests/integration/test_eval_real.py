"""Perplexity on the real default model: finite, reproducible, and `quept eval --json`'s schema."""

import json
import math
import os
import subprocess
import sys

import pytest

from quept_core.eval.perplexity import make_windows, perplexity, read_text, tokenize_text
from quept_core.io.models import load_model
from tests.support import REPO_ROOT, SHARED_DATA, WIKITEXT_TEST

pytestmark = pytest.mark.integration

VALID = SHARED_DATA / "wikitext-2" / "valid.txt"


def test_fp_perplexity_is_finite_and_identical_across_runs():
    loaded = load_model()
    windows = make_windows(tokenize_text(loaded.tokenizer, read_text(VALID)), 256, max_tokens=1024)
    first = perplexity(loaded.model, windows, batch_size=2)
    second = perplexity(loaded.model, windows, batch_size=4)
    assert math.isfinite(first.ppl) and 1.0 < first.ppl < 1000.0
    assert first.predicted_tokens == 4 * 255
    assert second.ppl == pytest.approx(first.ppl, rel=1e-6)


def test_quept_eval_json_schema():
    command = [sys.executable, "-m", "service", "eval", "--text", str(WIKITEXT_TEST), "--precision", "fp",
               "--seqlen", "512", "--max-tokens", "4096", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert data["model"] == "smollm2-135m" and data["seqlen"] == 512 and data["tokens"] == 4096
    (row,) = data["results"]
    assert row["precision"] == "fp" and row["method"] == "fp" and row["storage_bits"] == 16.0
    assert math.isfinite(row["ppl"]) and row["ppl"] > 1.0
