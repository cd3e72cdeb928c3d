"""The runtime on the real default model: logits against transformers, packed against fake-quant."""

import pytest
import torch

from quept_core.config import BitConfig
from quept_core.io.models import load_model
from quept_core.planning.plan import uniform_plan
from quept_core.quant.elastic import make_elastic, set_bits
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.kernels.formats import PACKED_MAX_TOKENS
from quept_core.runtime.protocol import SamplingParams, SequenceRequest

pytestmark = pytest.mark.integration

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side.")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    loaded = load_model()
    elastic = make_elastic(loaded.model, BitConfig())
    tokens = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    return loaded, elastic, tokens


def hf_logits(loaded, tokens, bits):
    set_bits(loaded.model, bits)
    try:
        with torch.no_grad():
            return loaded.model(tokens).logits[0]
    finally:
        set_bits(loaded.model, None)


def test_float32_forward_matches_transformers(setup):
    loaded, elastic, tokens = setup
    engine = QueptEngine.from_elastic(loaded, elastic, device="cpu", dtype=torch.float32)
    got = engine.logits(tokens, engine.plan("fp"))[0]
    assert torch.allclose(got, hf_logits(loaded, tokens, None), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("path", ["dense", "packed"])
def test_packed_plan_matches_fake_quantized_transformers(setup, bits, path):
    """A prompt longer than PACKED_MAX_TOKENS takes the dense path (bf16 activations, as evaluation
    windows do); a shorter one the packed kernels, whose int8 activations flip near-tied top tokens
    (agreement 0.87-0.91 on this text at w3-w8 against 0.98 on the dense path) while the distribution
    stays as close. Through 30 layers: compare distributions first, single logits second."""
    loaded, elastic, tokens = setup
    if path == "dense":
        tokens = torch.cat([tokens, tokens], dim=1)
    assert (tokens.shape[1] > PACKED_MAX_TOKENS) == (path == "dense")
    engine = QueptEngine.from_elastic(loaded, elastic, device="cpu")
    plan = uniform_plan(engine.linear_names, bits, None)  # head in full precision
    got = engine.logits(tokens, plan)[0]
    expected = hf_logits(loaded, tokens, bits)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert kl < 0.05 and agreement > (0.9 if path == "dense" else 0.8)


def test_a_running_set_of_mixed_plans_matches_each_plan_alone(setup):
    """Prompts at w4, w8 and fp joining one running set at different steps: each sequence's greedy
    tokens equal its tokens alone (the prompts have wide margins between their top two tokens)."""
    loaded, elastic, _ = setup
    engine = QueptEngine.from_elastic(loaded, elastic, device="cpu")
    prompts = [loaded.tokenizer(t).input_ids for t in ("The capital of France is", "One, two, three, four,",
                                                       "def fibonacci(n):")]
    plans = [engine.plan(p) for p in ("w4", "w8", "fp")]
    sampling = SamplingParams(max_new_tokens=6)
    alone = [engine.generate(p, plan, sampling) for p, plan in zip(prompts, plans, strict=True)]
    ids, tokens = [], {}
    for step in range(20):
        if step < len(prompts):
            ids += engine.add(SequenceRequest(prompts[step], plans[step], sampling))
        for event in engine.step():
            tokens.setdefault(event.seq_id, []).append(event.token_id)
    assert [tokens[i] for i in ids] == alone
    assert "Paris" in loaded.tokenizer.decode(alone[0])
