"""The engine on a tiny random model: plans and packs, the running set (join, leave, abort, mixed
plans in one step), the KV pool, sampling and log-probabilities."""

import gc
import random
import sys
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.planning.plan import Plan
from quept_core.precision import Precision, PrecisionError
from quept_core.runtime.engine import QueptEngine, prefill_batches
from quept_core.runtime.kvpool import KVPool, KVPoolFull
from quept_core.runtime.packcache import MemoryLimitError
from quept_core.runtime.protocol import SamplingParams, SequenceRequest, StepThreads
from quept_core.runtime.sampling import RequestError

PROMPTS = [[5, 9, 17, 3, 44, 12], [7, 8, 200], [100, 101, 102, 103], list(range(10, 40))]


def make_engine(**kwargs) -> QueptEngine:
    loaded = tiny_loaded()
    return QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def engine() -> QueptEngine:
    return make_engine(max_running=8)


def mixed_plan(engine: QueptEngine) -> Plan:
    """q, k and v (and gate and up) at different widths: no fused pack serves them."""
    return Plan(Precision.mixed(6.0), {name: (4, 6, 8)[i % 3] for i, name in enumerate(engine.linear_names)}, 6)


def request(prompt: list[int], plan: Plan, max_new_tokens: int = 6, **sampling) -> SequenceRequest:
    return SequenceRequest(prompt, plan, SamplingParams(max_new_tokens=max_new_tokens, **sampling))


def drain(engine: QueptEngine, arrivals: dict[int, list[SequenceRequest]] | None = None,
          aborts: dict[int, list[int]] | None = None) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
    """Step until idle, adding `arrivals[step]` before and aborting `aborts[step]` (indices) after
    that step; returns tokens and logits per request index."""
    arrivals, aborts = arrivals or {}, aborts or {}
    ids: dict[int, int] = {}  # seq id -> request index
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    step = 0
    while engine.running or any(s >= step for s in arrivals):
        for req in arrivals.get(step, []):
            ids[engine.add(req)[0]] = len(ids)
        for event in engine.step():
            index = ids[event.seq_id]
            tokens.setdefault(index, []).append(event.token_id)
            logits.setdefault(index, []).append(engine.last_logits[event.seq_id].clone())
        for index in aborts.get(step, []):
            engine.abort(next(s for s, i in ids.items() if i == index))
        step += 1
    return tokens, logits


def alone(engine: QueptEngine, req: SequenceRequest) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits = drain(engine, {0: [req]})
    return tokens[0], logits[0]


@pytest.mark.parametrize("plans", [("w4", "w4", "w4"), ("w3", "w8", "fp"), ("w4", "mixed", "w8")])
def test_a_sequence_gets_its_own_plans_tokens_in_any_running_set(engine, plans):
    """Joining at different steps, next to sequences of other plans: each sequence's tokens equal
    its tokens alone, and its logits stay within bf16 noise of them."""
    resolved = [mixed_plan(engine) if p == "mixed" else engine.plan(p) for p in plans]
    reqs = [request(PROMPTS[i], plan) for i, plan in enumerate(resolved)]
    expected = [alone(engine, r) for r in reqs]
    tokens, logits = drain(engine, {0: [reqs[0]], 2: [reqs[1]], 3: [reqs[2]]})
    for index, (want_tokens, want_logits) in enumerate(expected):
        assert tokens[index] == want_tokens
        for got, want in zip(logits[index], want_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2)


def test_prompts_prefilled_in_one_padded_call_get_their_tokens_alone(engine):
    """Three prompts of one plan arriving together share a prefill call, right-padded to the longest:
    each gets the tokens it gets alone, its first logits within bf16 noise of them."""
    plan = engine.plan("w4")
    reqs = [request(prompt, plan) for prompt in (PROMPTS[0], PROMPTS[2], [60, 61, 62, 63, 64])]
    assert prefill_batches([(plan, len(r.prompt_ids)) for r in reqs]) == [[1, 2, 0]]  # 4, 5, 6 tokens in 18 positions
    expected = [alone(engine, r) for r in reqs]
    tokens, logits = drain(engine, {0: reqs})
    for index, (want_tokens, want_logits) in enumerate(expected):
        assert tokens[index] == want_tokens
        for got, want in zip(logits[index], want_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2)


def test_each_phase_of_a_step_runs_on_the_threads_asked_for(engine, monkeypatch):
    seen: list[tuple[str, int]] = []

    def recording(phase: str, run):
        def wrapped(*args):
            seen.append((phase, torch.get_num_threads()))
            return run(*args)
        return wrapped

    monkeypatch.setattr(engine, "_prefill", recording("prefill", engine._prefill))
    monkeypatch.setattr(engine, "_decode", recording("decode", engine._decode))
    configured = torch.get_num_threads()
    w4 = engine.plan("w4")
    try:
        engine.add(request(PROMPTS[0], w4))
        engine.step(StepThreads(prefill=1, decode=2))
        engine.add(request(PROMPTS[1], w4))
        engine.step(StepThreads(prefill=2, decode=1))
        engine.step()  # as it is
    finally:
        torch.set_num_threads(configured)
        while engine.running:
            engine.step()
    assert seen[:4] == [("prefill", 1), ("prefill", 2), ("decode", 1), ("decode", 1)]


def test_prefill_batches_group_one_plans_prompts_of_similar_length():
    engine_plan, other = object(), object()  # any hashable plan
    prompts = [(engine_plan, 10), (engine_plan, 12), (other, 11), (engine_plan, 150), (engine_plan, 9)]
    # 9, 10 and 12 tokens pad to 36 positions for 31 tokens; adding 150 would pad 31 + 150 to 600.
    assert prefill_batches(prompts) == [[4, 0, 1], [3], [2]]
    assert prefill_batches([(engine_plan, 5)]) == [[0]] and prefill_batches([]) == []


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3, "repetition_penalty": 1.3}])
def test_a_sequence_that_ends_at_its_prefill_leaves_the_running_set_untouched(engine, sampling):
    """A request whose first token is its last (max_new_tokens 1) never joins the running set: the
    others' next steps sample their own rows with their own parameters."""
    plan = engine.plan("w4")
    running = [request(PROMPTS[0], plan, 6, **sampling), request(PROMPTS[2], plan, 6)]
    expected = drain(engine, {0: running})[0]
    tokens = drain(engine, {0: running, 2: [request(PROMPTS[1], engine.plan("w8"), 1)]})[0]
    assert tokens[0] == expected[0] and tokens[1] == expected[1] and len(tokens[2]) == 1


def test_missing_shares_say_what_running_a_plan_would_build():
    engine = make_engine()
    w4, mixed = engine.plan("w4"), mixed_plan(engine)
    fresh = engine.missing_shares(w4)
    assert set(fresh) == {4, engine.head_bits} and sum(fresh.values()) == pytest.approx(1.0)
    engine.prepare(w4)
    assert engine.missing_shares(w4) == {}
    # The mixed plan splits fused sites by width: it shares w4's packs only where it runs 4 bits unfused.
    assert 0 < sum(engine.missing_shares(mixed).values()) < 1
    engine.release(w4)
    assert engine.missing_shares(w4) == fresh


def test_plans_give_different_logits(engine):
    w4, w8 = alone(engine, request(PROMPTS[0], engine.plan("w4"))), alone(engine, request(PROMPTS[0], engine.plan("w8")))
    assert not torch.equal(w4[1][0], w8[1][0])


def test_abort_at_any_step_keeps_every_other_sequence(engine):
    plan = engine.plan("w5")
    reqs = [request(p, plan, 8) for p in PROMPTS[:3]]
    expected = drain(engine, {0: reqs})[0]
    got = drain(engine, {0: reqs}, aborts={2: [1]})[0]
    assert got[1] == expected[1][:3]
    assert got[0] == expected[0] and got[2] == expected[2]
    assert engine.free_slots == engine.max_running


def test_abort_before_the_prefill_gives_no_event(engine):
    (seq_id,) = engine.add(request(PROMPTS[0], engine.plan("w4")))
    engine.abort(seq_id)
    engine.abort(seq_id)  # twice, or an unknown id: ignored
    assert engine.step() == [] and engine.running == 0 and engine.free_slots == engine.max_running


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5), st.booleans()), min_size=1, max_size=12),
       st.integers(0, 2**16))
def test_the_kv_pool_never_leaks_slots(engine, schedule, seed):
    """Random arrivals (prompt, length, aborted or not) at random steps: every slot comes back."""
    rng = random.Random(seed)
    plans = [engine.plan("w4"), engine.plan("w8")]
    live: list[int] = []
    for prompt, length, aborted in schedule:
        if engine.free_slots:
            ids = engine.add(request(PROMPTS[prompt], rng.choice(plans), length), n=min(engine.free_slots, 1 + rng.randrange(2)))
            live += ids
            if aborted:
                engine.abort(rng.choice(ids))
        engine.step()
        assert engine.free_slots + engine.running == engine.max_running
    while engine.running:
        engine.step()
    assert engine.free_slots == engine.max_running


def test_a_full_pool_refuses_with_a_clear_error():
    small = make_engine(max_running=2)
    small.add(request(PROMPTS[0], small.plan("w4")), n=2)
    with pytest.raises(KVPoolFull, match="KV slots"):
        small.add(request(PROMPTS[1], small.plan("w4")))


def test_n_sequences_share_one_prefill(engine):
    plan = engine.plan("w6")
    ids = engine.add(request(PROMPTS[0], plan, 5), n=3)
    first = engine.step()
    assert engine.last_step.prefill_tokens == len(PROMPTS[0])  # one prefill for three sequences
    assert [e.seq_id for e in first] == ids
    tokens = {i: [] for i in ids}
    for event in first:
        tokens[event.seq_id].append(event.token_id)
    while engine.running:
        for event in engine.step():
            tokens[event.seq_id].append(event.token_id)
    greedy = alone(engine, request(PROMPTS[0], plan, 5))[0]
    assert all(t == greedy for t in tokens.values())


def test_seeded_sampling_is_reproducible_and_forks_draw_their_own_seeds(engine):
    plan = engine.plan("w6")
    sampled = request(PROMPTS[1], plan, 8, temperature=1.5, seed=7)
    runs = [drain(engine, {0: [sampled]})[0][0] for _ in range(2)]
    assert runs[0] == runs[1]
    ids = engine.add(sampled, n=2)
    forks: dict[int, list[int]] = {i: [] for i in ids}
    while engine.running:
        for event in engine.step():
            forks[event.seq_id].append(event.token_id)
    assert forks[ids[0]] == runs[0] and forks[ids[1]] != runs[0]
    greedy = alone(engine, request(PROMPTS[1], plan, 8))[0]
    assert alone(engine, request(PROMPTS[1], plan, 8, temperature=0.7, top_k=1, seed=1))[0] == greedy
    assert alone(engine, request(PROMPTS[1], plan, 8, temperature=0.7, top_p=1e-6, seed=2))[0] == greedy


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.7, "top_k": 3, "repetition_penalty": 1.3, "seed": 5}],
                         ids=["greedy", "sampled"])
def test_logprobs_are_the_raw_models_whatever_the_sampling(engine, sampling):
    plan = engine.plan("w8")
    (seq_id,) = engine.add(request(PROMPTS[0], plan, 3, logprobs=5, **sampling))
    while engine.running:
        (event,) = engine.step()
        expected = engine.last_logits[seq_id].log_softmax(-1)
        assert event.logprob.token_id == event.token_id
        assert event.logprob.logprob == pytest.approx(float(expected[event.token_id]), abs=1e-5)
        assert [t.token_id for t in event.top_logprobs] == torch.topk(expected, 5).indices.tolist()
        assert [t.logprob for t in event.top_logprobs] == pytest.approx(torch.topk(expected, 5).values.tolist(),
                                                                         abs=1e-5)
    if not sampling:
        assert event.top_logprobs[0].token_id == event.token_id


def test_repetition_penalty_changes_greedy_choice(engine):
    plan = engine.plan("fp")
    plain = alone(engine, request(PROMPTS[0], plan, 12))[0]
    penalised = alone(engine, request(PROMPTS[0], plan, 12, repetition_penalty=50.0))[0]
    assert len(set(penalised)) == len(penalised) and plain != penalised


@pytest.mark.parametrize("extreme", [
    {"temperature": 1.6e308, "top_p": 0.99999, "repetition_penalty": 2.2e-309},  # found by the fuzz test
    {"temperature": 5e-324, "repetition_penalty": 1e300},
    {"temperature": 1e-300, "top_k": 3, "repetition_penalty": 1e-40},
])
def test_sampling_at_the_ends_of_the_accepted_ranges_draws_real_tokens(engine, extreme):
    """Temperatures and penalties the API accepts, however extreme, leave no infinity or NaN in the draw."""
    plan = engine.plan("w4")
    tokens, _ = alone(engine, request(PROMPTS[3], plan, 6, seed=1, **extreme))
    assert len(tokens) == 6 and all(0 <= t < engine.model.dims.vocab for t in tokens)


def test_sequences_finish_with_length_and_eos(engine):
    plan = engine.plan("fp")
    ids = [engine.add(request(PROMPTS[0], plan, 1))[0], engine.add(request(PROMPTS[1], plan, 3))[0]]
    first = {e.seq_id: e for e in engine.step()}
    assert first[ids[0]].finish_reason == "length"
    engine.eos_ids = frozenset({first[ids[1]].token_id})
    try:
        while engine.running:
            engine.step()
        again = engine.add(request(PROMPTS[1], plan, 3))
        assert engine.step()[0].finish_reason == "eos" and again
    finally:
        engine.eos_ids = frozenset({255})


def test_switching_between_resident_plans_builds_nothing(engine):
    plans = [engine.plan("w3"), engine.plan("w6"), mixed_plan(engine)]
    for plan in plans:
        alone(engine, request(PROMPTS[0], plan, 2))
    builds = engine.cache.builds
    for plan in (*plans, *plans):
        alone(engine, request(PROMPTS[0], plan, 2))
    drain(engine, {0: [request(PROMPTS[0], plans[0], 3), request(PROMPTS[1], plans[1], 3)],
                   1: [request(PROMPTS[2], plans[2], 3)]})
    assert engine.cache.builds == builds


def test_uniform_plans_run_fused_packs_and_mixed_ones_split_them(engine):
    keys = engine.pack_keys(engine.plan("w5"))
    assert ("model.layers.0.self_attn.qkv_proj", 5) in keys and ("model.layers.0.mlp.gate_up_proj", 5) in keys
    assert len(keys) == 2 * 4 + 1
    mixed = engine.pack_keys(mixed_plan(engine))
    assert ("model.layers.0.self_attn.q_proj", 4) in mixed and ("model.layers.0.self_attn.k_proj", 6) in mixed
    for key in mixed:
        pack = engine.cache.ensure([key])[0]
        numel = pack.in_features * pack.out_features
        # b bits per weight plus at most 6 bytes of scale and zero-point per group of 64.
        assert pack.nbytes <= numel * (key[1] or 16) / 8 + numel / 64 * 6


def test_eviction_under_a_small_limit_keeps_results_identical(engine):
    plans = ["w4", "w8", "w5", "w4", "fp", "w8"]
    expected = [alone(engine, request(PROMPTS[0], engine.plan(p)))[1] for p in plans]
    one_plan = max(engine.weight_bytes(engine.plan(p)) for p in plans)
    small = make_engine(memory_limit_bytes=int(one_plan * 1.2))
    got = [alone(small, request(PROMPTS[0], small.plan(p)))[1] for p in plans]
    assert small.cache.evictions > 0 and small.cache.resident_bytes <= small.cache.limit_bytes
    for want, have in zip(expected, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(want, have, strict=True))


def test_an_evicted_pack_is_freed_not_kept_by_a_remembered_layout(engine):
    one_plan = max(engine.weight_bytes(engine.plan(p)) for p in ("w3", "w8"))
    small = make_engine(memory_limit_bytes=int(one_plan * 1.2))
    w8 = small.plan("w8")
    small.prepare(w8)
    keys = small.pack_keys(w8)
    packs = dict(zip(keys, map(weakref.ref, small.cache.ensure(keys)), strict=True))
    small.prepare(small.plan("w3"))
    gc.collect()
    evicted = [key for key in keys if key not in small.cache]
    assert evicted and all(packs[key]() is None for key in evicted)


def test_a_released_plan_frees_only_its_own_packs_and_stays_servable():
    engine = make_engine()
    fp, w4 = engine.plan("fp"), engine.plan("w4")
    before = {name: alone(engine, request(PROMPTS[0], engine.plan(name)))[1] for name in ("fp", "w4")}
    keys = engine.pack_keys(fp)
    packs = dict(zip(keys, map(weakref.ref, engine.cache.ensure(keys)), strict=True))
    engine.release(fp)
    gc.collect()
    assert all(key not in engine.cache and packs[key]() is None for key in keys)
    assert all(key in engine.cache for key in engine.pack_keys(w4))
    for name in ("fp", "w4"):
        after = alone(engine, request(PROMPTS[0], engine.plan(name)))[1]
        assert all(torch.equal(a, b) for a, b in zip(before[name], after, strict=True))


def test_plan_larger_than_the_limit_is_a_clear_error():
    small = make_engine(memory_limit_bytes=50_000)
    with pytest.raises(MemoryLimitError, match="memory limit"):
        small.weight_bytes(small.plan("w8"))
    assert small.cache.resident_bytes <= 50_000


def test_mixed_precision_resolves_through_the_resolver():
    calls = []

    def resolver(budget):
        calls.append(budget)
        return Plan(Precision.mixed(budget), {name: 4 if i < 7 else 6 for i, name in enumerate(names)})

    engine = make_engine(mixed_resolver=resolver)
    names = engine.linear_names
    plan = engine.plan("mixed:4.5")
    assert calls == [4.5] and plan.name == "mixed:4.50"
    assert plan.lm_head_bits == engine.head_bits == 8
    assert len(alone(engine, request(PROMPTS[0], plan, 3))[0]) == 3


@pytest.mark.parametrize(("prompt", "sampling", "field"), [
    ([], SamplingParams(), "prompt_ids"),
    ([1, 999], SamplingParams(), "prompt_ids"),
    ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1], SamplingParams(temperature=-1), "temperature"),
    ([1], SamplingParams(top_p=0), "top_p"),
    ([1], SamplingParams(top_k=-2), "top_k"),
    ([1], SamplingParams(logprobs=21), "logprobs"),
])
def test_bad_requests_name_the_field(engine, prompt, sampling, field):
    with pytest.raises(RequestError, match=field):
        engine.add(SequenceRequest(prompt, engine.plan("w4"), sampling))
    assert engine.free_slots == engine.max_running


@pytest.mark.parametrize("precision", ["w9", "w2", "mixed:3.5", "int4"])
def test_unknown_or_unresolvable_precisions_are_rejected(engine, precision):
    with pytest.raises(PrecisionError, match="precision|allowed"):
        engine.plan(precision)


def test_plan_with_a_bit_width_outside_the_bit_set_is_rejected(engine):
    bad = Plan(Precision.uniform(2), {name: 2 for name in engine.linear_names}, None)
    with pytest.raises(PrecisionError, match="allowed"):
        engine.add(SequenceRequest([1, 2], bad))


def test_kv_bytes_per_token_matches_the_pool(engine):
    pool = engine.pool
    assert pool.k.nbytes + pool.v.nbytes == engine.kv_bytes_per_token * pool.slots * pool.max_len
    (seq_id,) = engine.add(request([1, 2, 3], engine.plan("w4"), 7))
    assert engine.kv_usage == pytest.approx(10 / (pool.slots * pool.max_len))
    engine.abort(seq_id)


@pytest.mark.skipif(sys.platform != "linux", reason="pages given back read as zeros on Linux only")
def test_an_idle_pool_gives_its_pages_back_and_serves_on():
    pool = KVPool(2, 4, 2, 4096, 64, torch.device("cpu"), torch.bfloat16)  # 8 MiB a tensor
    pool.k.fill_(1.0)
    pool.v.fill_(1.0)
    slot = pool.allocate()
    with pytest.raises(RuntimeError, match="KV slots in use: 1"):
        pool.release_pages()
    assert pool.k.sum() > 0  # refused: nothing released
    pool.release(slot)
    pool.release_pages()
    # Whole pages read as zeros once the system took them back (a tensor's first and last page may
    # be shared with other memory and stay).
    assert pool.k[:, 1:3].abs().sum() == 0 and pool.v[:, 1:3].abs().sum() == 0
    engine = make_engine(max_running=2)
    plan = engine.plan("w4")
    expected, _ = alone(engine, request(PROMPTS[0], plan))
    engine.pool.release_pages()
    assert alone(engine, request(PROMPTS[0], plan))[0] == expected


def test_uninitialised_kv_positions_never_reach_a_sequence():
    """The pool is allocated uninitialised: garbage (here NaN) past a sequence's own positions, read
    because a longer sequence shares the step, must not change its logits."""
    engine = make_engine(max_running=3)
    plan = engine.plan("w4")
    expected = alone(engine, request(PROMPTS[1], plan))
    engine.pool.k.fill_(float("nan"))
    engine.pool.v.fill_(float("nan"))
    tokens, logits = drain(engine, {0: [request(PROMPTS[3], plan), request(PROMPTS[1], plan)]})
    assert tokens[1] == expected[0]
    assert all(torch.isfinite(row).all() for row in logits[0] + logits[1])


def test_relayout_due_says_when_the_next_step_rebuilds_the_layout(engine):
    plan = engine.plan("w4")
    assert not engine.relayout_due  # nothing decodes
    (first,) = engine.add(request(PROMPTS[0], plan, max_new_tokens=6))
    engine.step()  # its prefill: it joins the decoding set
    assert engine.relayout_due
    engine.step()
    assert not engine.relayout_due and engine.last_step.layout_s > 0
    engine.step()
    assert not engine.relayout_due and engine.last_step.layout_s == 0
    engine.abort(first)
    assert not engine.relayout_due  # nothing left to decode
    drain(engine)
