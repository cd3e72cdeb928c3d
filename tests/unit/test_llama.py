"""The compact forward pass against transformers' LlamaForCausalLM on tiny random models."""

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.protocol import SamplingParams, SequenceRequest

ROPE_SCALINGS = [
    None,
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
]


def fp32_engine(**overrides) -> tuple:
    loaded = tiny_loaded(**overrides)
    engine = QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu",
                         dtype=torch.float32)
    return loaded, engine


@pytest.mark.parametrize("rope", ROPE_SCALINGS)
def test_prefill_logits_match_transformers(rope):
    overrides = {} if rope is None else {"rope_parameters": rope}
    loaded, engine = fp32_engine(**overrides)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = loaded.model(tokens).logits
    got = engine.logits(tokens, engine.plan("fp"))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_untied_head_matches_transformers():
    loaded, engine = fp32_engine(tie_word_embeddings=False)
    assert not engine.model.tied
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = loaded.model(tokens).logits
    assert torch.allclose(engine.logits(tokens, engine.plan("fp")), expected, atol=1e-4, rtol=1e-4)


def test_decode_steps_match_full_forward():
    """Sequences of different lengths that join at different steps: every step's logits equal a full
    forward pass over the sequence so far."""
    loaded, engine = fp32_engine()
    plan = engine.plan("fp")
    prompts = [[5, 9, 17, 3, 44], [7, 8], [100, 101, 102, 103, 104, 105, 106, 107, 108]]
    sequences: dict[int, list[int]] = {}
    for step in range(9):
        if step < len(prompts):
            (seq_id,) = engine.add(SequenceRequest(prompts[step], plan, SamplingParams(max_new_tokens=6)))
            sequences[seq_id] = list(prompts[step])
        for event in engine.step():
            with torch.no_grad():
                expected = loaded.model(torch.tensor([sequences[event.seq_id]])).logits[0, -1]
            assert torch.allclose(engine.last_logits[event.seq_id], expected, atol=1e-4, rtol=1e-4)
            sequences[event.seq_id].append(event.token_id)
    assert engine.running == 0
    assert [len(s) - len(p) for s, p in zip(sequences.values(), prompts, strict=True)] == [6, 6, 6]


def test_greedy_generation_matches_transformers_generate():
    loaded, engine = fp32_engine()
    prompt = [3, 14, 15, 92, 65]
    with torch.no_grad():
        expected = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = engine.generate(prompt, engine.plan("fp"), SamplingParams(max_new_tokens=10))
    # Our run stops at the end-of-sequence token; transformers was told not to.
    assert got == expected[: len(got)]
    assert len(got) == 10 or got[-1] in engine.eos_ids


def test_ragged_decode_in_bfloat16_writes_the_float32_cache():
    """Sequences at different positions take the PyTorch step's indexed cache write; on CPU its cache
    is float32 while the model computes in bfloat16 (the native step's is bf16: test_native_step.py)."""
    loaded = tiny_loaded()
    engine = QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu", native=False)
    assert engine.pool.k.dtype == torch.float32
    for prompt in ([5, 9, 17, 3, 44], [7, 8]):
        engine.add(SequenceRequest(prompt, engine.plan("w4"), SamplingParams(max_new_tokens=3)))
    produced = []
    while engine.running:
        produced += engine.step()
        assert all(torch.isfinite(row).all() for row in engine.last_logits.values())
    assert len(produced) == 2 * 3
