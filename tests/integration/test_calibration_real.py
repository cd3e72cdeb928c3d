"""The calibrated default model (fast preset, the artifact a first `quept serve` makes) against plain
round-to-nearest on held-out text: the claim QuEPT exists to make, checked where it matters."""


import pytest

from quept_core.artifact.store import ensure_artifact, load_artifact
from quept_core.eval.perplexity import make_windows, perplexity, read_text, tokenize_text
from quept_core.io.models import load_model
from quept_core.layers import model_linear_names
from quept_core.planning.plan import uniform_plan
from quept_core.quant.sources import QueptWeights, RtnWeights, dequantized_weights, float_weights, use_weights
from tests.support import WIKITEXT_TEST

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setting():
    loaded = load_model()
    calibrated = load_artifact(ensure_artifact(loaded, "fast"), loaded)  # calibrated once, then cached
    base = load_model()
    windows = make_windows(tokenize_text(base.tokenizer, read_text(WIKITEXT_TEST)), 512, max_tokens=4096)
    names = model_linear_names(base.model)
    # Each method's weights go into its own model: the calibrated one carries the equalized norms.
    return windows, names, {
        "quept": (loaded.model, QueptWeights(calibrated.elastic)),
        "rtn": (base.model, RtnWeights(float_weights(base.model, names), calibrated.bit_config)),
    }


# The largest QuEPT / round-to-nearest perplexity ratio allowed per width on these 4,096 tokens. The fast
# preset measures w3 0.494, w4 0.839, w6 0.982 here. The 3-bit bound sits between that and the same preset
# without its end-to-end stage (0.524), which fails it; the 4-bit one keeps 4 % of room for another CPU's
# calibration (without the stage: 0.868). A calibration without its equalization and clip search (w3 0.87
# of RTN on WikiText, docs/benchmarks.md) fails both.
# At 8 bits both sit on the full-precision perplexity, but the input scaling chosen for 3 and 4 bits widens
# the 8-bit rows' grids: QuEPT measures 1.0011 of RTN here (the fast preset starts them unclipped; 1.0024
# when they started from the clip search) and 1.006 on 32,768 tokens (docs/benchmarks.md, "Activation-aware
# equalization"); the bound holds it to that cost.
MAX_RATIO = {3: 0.515, 4: 0.88, 6: 1.0, 8: 1.008}


@pytest.mark.parametrize("bits", sorted(MAX_RATIO))
def test_quept_beats_round_to_nearest_by_the_margin_it_reaches(setting, bits):
    windows, names, methods = setting
    plan = uniform_plan(names, bits)
    ppl = {}
    for method, (model, source) in methods.items():
        with use_weights(model, dequantized_weights(source, plan.layer_bits)):
            ppl[method] = perplexity(model, windows).ppl
    assert ppl["quept"] <= ppl["rtn"] * MAX_RATIO[bits], ppl
