"""Plans, switching, the pack cache and the batch protocol on a tiny random model."""

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.planning.plan import Plan
from quept_core.precision import Precision, PrecisionError
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.packcache import MemoryLimitError
from quept_core.runtime.protocol import SamplingParams, SequenceRequest
from quept_core.runtime.sampling import RequestError

PROMPTS = [[5, 9, 17, 3, 44, 12], [7, 8, 200], [100, 101, 102, 103]]


def make_engine(**kwargs) -> QueptEngine:
    loaded = tiny_loaded()
    return QueptEngine(loaded, tiny_elastic(loaded), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def engine() -> QueptEngine:
    return make_engine()


def requests(max_new_tokens: int = 5, **sampling) -> list[SequenceRequest]:
    return [SequenceRequest(p, SamplingParams(max_new_tokens=max_new_tokens, **sampling)) for p in PROMPTS]


def run(batch) -> tuple[dict[int, list[int]], list[torch.Tensor]]:
    tokens: dict[int, list[int]] = {}
    logits = []
    while not batch.done:
        for event in batch.step():
            tokens.setdefault(event.seq, []).append(event.token_id)
        logits.append(batch.last_logits.clone())
    return tokens, logits


def test_switching_mid_stream_gives_each_batch_its_own_plans_logits(engine):
    w4, w8 = engine.plan("w4"), engine.plan("w8")
    solo4 = run(engine.start_batch(requests(), w4))
    solo8 = run(engine.start_batch(requests(), w8))
    batch4, batch8 = engine.start_batch(requests(), w4), engine.start_batch(requests(), w8)
    logits4, logits8 = [], []
    while not (batch4.done and batch8.done):
        for batch, sink in ((batch4, logits4), (batch8, logits8)):
            if not batch.done:
                batch.step()
                sink.append(batch.last_logits.clone())
    assert all(torch.equal(a, b) for a, b in zip(logits4, solo4[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(logits8, solo8[1], strict=True))
    assert not torch.equal(solo4[1][0], solo8[1][0])


@pytest.mark.parametrize("precision", ["w3", "w8", "mixed"])
def test_a_sequence_gets_the_same_tokens_alone_and_batched(engine, precision):
    plan = engine.plan(precision) if precision != "mixed" else Plan(
        Precision.mixed(6.0), {name: (4, 6, 8)[i % 3] for i, name in enumerate(engine.linear_names)}, 8)
    long_prompt = list(range(10, 40))  # past the packed kernel's per-sequence limit: the dense prefill path
    for prompt in (PROMPTS[0], long_prompt):
        alone, alone_logits = run(engine.start_batch([SequenceRequest(prompt, SamplingParams(max_new_tokens=6))], plan))
        mates = [SequenceRequest(p, SamplingParams(max_new_tokens=6)) for p in (*PROMPTS[1:], long_prompt)]
        batched, batched_logits = run(engine.start_batch([SequenceRequest(prompt, SamplingParams(max_new_tokens=6)),
                                                          *mates], plan))
        assert batched[0] == alone[0]
        # Not bit for bit: batch mates change matmul shapes and so the order of float sums.
        torch.testing.assert_close(batched_logits[0][0], alone_logits[0][0], rtol=0, atol=1e-2)


def test_switch_between_resident_plans_is_a_pointer_swap(engine):
    w3, w6 = engine.plan("w3"), engine.plan("w6")
    engine.set_plan(w3)
    first = [slot.pack for slot in engine.model.linear_slots()]
    engine.set_plan(w6)
    builds = engine.cache.builds
    engine.set_plan(w3)
    engine.set_plan(w6)
    engine.set_plan(w3)
    assert engine.cache.builds == builds
    assert all(a is slot.pack for a, slot in zip(first, engine.model.linear_slots()))


def test_eviction_under_a_small_limit_keeps_results_identical(engine):
    plans = ["w4", "w8", "w5", "w4", "fp", "w8"]
    expected = [run(engine.start_batch(requests(), engine.plan(p)))[1] for p in plans]
    one_plan = max(engine.weight_bytes(engine.plan(p)) for p in plans)
    small = make_engine(memory_limit_bytes=int(one_plan * 1.2))
    got = [run(small.start_batch(requests(), small.plan(p)))[1] for p in plans]
    assert small.cache.evictions > 0
    assert small.cache.resident_bytes <= small.cache.limit_bytes
    for want, have in zip(expected, got):
        assert all(torch.equal(a, b) for a, b in zip(want, have, strict=True))


def test_plan_larger_than_the_limit_is_a_clear_error():
    small = make_engine(memory_limit_bytes=50_000)
    with pytest.raises(MemoryLimitError, match="memory limit"):
        small.set_plan(small.plan("w8"))
    assert small.cache.resident_bytes <= 50_000


def test_mixed_plan_runs_each_layer_at_its_own_bits(engine):
    names = engine.linear_names
    layer_bits = {name: (3 if i % 2 else 8) for i, name in enumerate(names)}
    mixed = Plan(Precision.mixed(5.5), layer_bits, 8)
    engine.set_plan(mixed)
    for slot in engine.model.linear_slots():
        # q, k, v (and gate, up) differ in bits here, so each runs its own pack.
        assert slot.pack is engine.cache.ensure([(slot.name, layer_bits[slot.name])])[0]
        numel = slot.pack.in_features * slot.pack.out_features
        # b bits per weight plus at most 6 bytes of scale and zero-point per group of 64.
        assert slot.pack.nbytes <= numel * layer_bits[slot.name] / 8 + numel / 64 * 6
    assert all(block.qkv.pack is None and block.gate_up.pack is None for block in engine.model.blocks)
    tokens, _ = run(engine.start_batch(requests(), mixed))
    assert sorted(tokens) == [0, 1, 2]


def test_mixed_precision_resolves_through_the_resolver():
    calls = []

    def resolver(avg_bits):
        calls.append(avg_bits)
        return Plan(Precision.mixed(avg_bits), {name: 4 if i < 7 else 6 for i, name in enumerate(names)})

    engine = make_engine(mixed_resolver=resolver)
    names = engine.linear_names
    plan = engine.plan("mixed:4.5")
    assert calls == [4.5] and plan.name == "mixed:4.50"
    assert plan.lm_head_bits == engine.head_bits == 8
    assert run(engine.start_batch(requests(3), plan))[0].keys() == {0, 1, 2}


def test_uniform_plan_runs_fused_projections(engine):
    engine.set_plan(engine.plan("w5"))
    for block in engine.model.blocks:
        assert block.qkv.pack.out_features == 128 + 64 + 64
        assert block.gate_up.pack.out_features == 2 * 256
        assert all(slot.pack is None for slot in (block.q, block.k, block.v, block.gate, block.up))


def test_cancel_stops_one_sequence_and_keeps_the_others(engine):
    plan = engine.plan("w4")
    expected, _ = run(engine.start_batch(requests(6), plan))
    batch = engine.start_batch(requests(6), plan)
    got: dict[int, list[int]] = {}
    for step in range(6):
        if step == 2:
            batch.cancel(1)
        for event in batch.step():
            got.setdefault(event.seq, []).append(event.token_id)
    assert batch.done
    assert got[1] == expected[1][:2]
    assert got[0] == expected[0] and got[2] == expected[2]


def test_sequences_finish_with_length_and_eos(engine):
    plan = engine.plan("fp")
    batch = engine.start_batch([SequenceRequest(PROMPTS[0], SamplingParams(max_new_tokens=1)),
                                SequenceRequest(PROMPTS[1], SamplingParams(max_new_tokens=3))], plan)
    first = batch.step()
    assert first[0].finish_reason == "length" and (first[1].finish_reason is None or first[1].token_id in engine.eos_ids)
    engine.eos_ids = frozenset({first[1].token_id})
    try:
        again = engine.start_batch([SequenceRequest(PROMPTS[1], SamplingParams(max_new_tokens=3))], plan).step()
    finally:
        engine.eos_ids = frozenset({255})
    assert again[0].finish_reason == "eos"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    plan = engine.plan("w6")
    sampled = [run(engine.start_batch(requests(8, temperature=1.5, seed=7), plan))[0] for _ in range(2)]
    assert sampled[0] == sampled[1]
    other = run(engine.start_batch(requests(8, temperature=1.5, seed=8), plan))[0]
    assert other != sampled[0]
    greedy = run(engine.start_batch(requests(8), plan))[0]
    assert run(engine.start_batch(requests(8, temperature=0.7, top_k=1, seed=1), plan))[0] == greedy
    assert run(engine.start_batch(requests(8, temperature=0.7, top_p=1e-6, seed=2), plan))[0] == greedy


def test_repetition_penalty_changes_greedy_choice(engine):
    plan = engine.plan("fp")
    plain = run(engine.start_batch(requests(12), plan))[0]
    penalised = run(engine.start_batch(requests(12, repetition_penalty=50.0), plan))[0]
    for tokens in penalised.values():
        assert len(set(tokens)) == len(tokens)
    assert plain != penalised


@pytest.mark.parametrize(("request_", "field"), [
    (SequenceRequest([]), "prompt_ids"),
    (SequenceRequest([1, 999]), "prompt_ids"),
    (SequenceRequest([1], SamplingParams(max_new_tokens=0)), "max_new_tokens"),
    (SequenceRequest([1], SamplingParams(temperature=-1)), "temperature"),
    (SequenceRequest([1], SamplingParams(top_p=0)), "top_p"),
    (SequenceRequest([1], SamplingParams(top_k=-2)), "top_k"),
])
def test_bad_requests_name_the_field(engine, request_, field):
    with pytest.raises(RequestError, match=field):
        engine.start_batch([request_], engine.plan("w4"))


@pytest.mark.parametrize("precision", ["w9", "w2", "mixed:3.5", "int4"])
def test_unknown_or_unresolvable_precisions_are_rejected(engine, precision):
    with pytest.raises(PrecisionError, match="precision|allowed"):
        engine.plan(precision)


def test_plan_with_a_bit_width_outside_the_bit_set_is_rejected(engine):
    bad = Plan(Precision.uniform(2), {name: 2 for name in engine.linear_names}, None)
    with pytest.raises(PrecisionError, match="allowed"):
        engine.set_plan(bad)


def test_kv_bytes_per_token_matches_the_allocated_cache(engine):
    batch = engine.start_batch([SequenceRequest([1, 2, 3], SamplingParams(max_new_tokens=7))], engine.plan("w4"))
    cache = batch._cache
    assert cache.k.nbytes + cache.v.nbytes == engine.kv_bytes_per_token * cache.max_len
