"""The calibrated default model (fast preset, the artifact a first `quept serve` makes) against plain
round-to-nearest on held-out text: the claim QuEPT exists to make, checked where it matters."""

from pathlib import Path

import pytest

from quept_core.artifact.store import ensure_artifact, load_artifact
from quept_core.eval.perplexity import make_windows, perplexity, read_text, tokenize_text
from quept_core.io.models import load_model
from quept_core.layers import model_linear_names
from quept_core.planning.plan import uniform_plan
from quept_core.quant.sources import QueptWeights, RtnWeights, dequantized_weights, float_weights, use_weights

pytestmark = pytest.mark.integration

TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def setting():
    loaded = load_model()
    calibrated = load_artifact(ensure_artifact(loaded, "fast"), loaded)  # calibrated once, then cached
    base = load_model()
    windows = make_windows(tokenize_text(base.tokenizer, read_text(TEST)), 512, max_tokens=4096)
    names = model_linear_names(base.model)
    # Each method's weights go into its own model: the calibrated one carries the equalized norms.
    return windows, names, {
        "quept": (loaded.model, QueptWeights(calibrated.elastic)),
        "rtn": (base.model, RtnWeights(float_weights(base.model, names), calibrated.bit_config)),
    }


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_quept_is_no_worse_than_round_to_nearest(setting, bits):
    windows, names, methods = setting
    plan = uniform_plan(names, bits)
    ppl = {}
    for method, (model, source) in methods.items():
        with use_weights(model, dequantized_weights(source, plan.layer_bits)):
            ppl[method] = perplexity(model, windows).ppl
    # Within 0.2 % counts as a tie at 8 bits, where both sit on the full-precision perplexity.
    assert ppl["quept"] <= ppl["rtn"] * 1.002, ppl
