"""The thread tuner against scripted hosts: each phase's measured over modelled seconds per thread count."""

from __future__ import annotations

from collections.abc import Callable

from service.engine.costs import DECODE, PREFILL
from service.engine.threads import EXPLORE_EVERY, MAX_EXPLORE_EVERY, ThreadTuner

Host = Callable[[str, int], float]  # (phase, threads) -> the step's ratio


def quiet(phase: str, threads: int) -> float:
    return {1: 1.7, 2: 1.0}[threads] if phase == PREFILL else 1.0


def contended(phase: str, threads: int) -> float:
    """Two busy loops on the two cores: a parallel region waits for its preempted thread."""
    return {1: 2.7, 2: 6.1}[threads] if phase == PREFILL else {1: 1.6, 2: 2.8}[threads]


def run(tuner: ThreadTuner, host: Host, steps: int, prefill: bool = True) -> list:
    """Steps of both phases (or decode only); the threads each ran on."""
    ran = []
    for _ in range(steps):
        choice = tuner.next_step(prefill=prefill, decode=True)
        threads = {PREFILL: choice.threads.prefill, DECODE: choice.threads.decode}
        tuner.observe(choice, {phase: host(phase, threads[phase]) for phase in ((PREFILL, DECODE) if prefill
                                                                               else (DECODE,))})
        ran.append(choice)
    return ran


def test_a_quiet_host_keeps_every_core_and_tries_one_thread_rarely():
    tuner = ThreadTuner(2)
    ran = run(tuner, quiet, 1000)
    assert tuner.chosen == {PREFILL: 2, DECODE: 2}
    assert all(c.threads.prefill == 2 and c.threads.decode == 2 for c in ran if not c.trying)
    prefill_tries = [i for i, c in enumerate(ran) if c.trying and c.threads.prefill == 1]
    # One thread prefills 1.7x slower here: the tries back off (a quarter of one per EXPLORE_EVERY steps)...
    assert len(prefill_tries) <= 1000 // EXPLORE_EVERY // 4
    assert prefill_tries[-1] > 1000 - 2 * MAX_EXPLORE_EVERY  # ...and never stop
    # One thread decodes as fast: its tries stay at every EXPLORE_EVERY-th step.
    assert sum(c.trying and c.threads.decode == 1 for c in ran) >= 1000 // (2 * EXPLORE_EVERY)


def test_contention_moves_both_phases_to_one_thread_within_a_few_steps_and_back_after():
    tuner = ThreadTuner(2)
    run(tuner, quiet, 1000)  # the tries of one thread backed off
    ran = run(tuner, contended, 12)
    assert tuner.chosen == {PREFILL: 1, DECODE: 1}
    assert sum(c.trying for c in ran) <= 4  # a try on the host's change and its confirmation, per phase
    run(tuner, contended, 100)
    assert tuner.chosen == {PREFILL: 1, DECODE: 1}  # the tries of two threads keep losing
    run(tuner, quiet, 12)
    assert tuner.chosen == {PREFILL: 2, DECODE: 2}


def test_a_phase_that_runs_as_fast_on_either_count_stays_on_the_configured_one():
    tuner = ThreadTuner(2)
    run(tuner, lambda phase, threads: 1.0 if threads == 2 else 0.95, 300, prefill=False)
    assert tuner.chosen[DECODE] == 2


def test_one_lucky_try_does_not_switch():
    tuner = ThreadTuner(2)
    run(tuner, quiet, EXPLORE_EVERY)
    choice = tuner.next_step(prefill=True, decode=False)
    assert choice.trying and choice.threads.prefill == 1
    tuner.observe(choice, {PREFILL: 0.5})  # once faster than two threads
    confirm = tuner.next_step(prefill=True, decode=False)
    assert confirm.trying and confirm.threads.prefill == 1  # confirmed at once...
    tuner.observe(confirm, {PREFILL: 1.7})
    assert tuner.chosen[PREFILL] == 2  # ...and not confirmed


def test_steps_that_must_run_as_the_others_never_try():
    tuner = ThreadTuner(2)
    for _ in range(5 * EXPLORE_EVERY):
        choice = tuner.next_step(prefill=True, decode=True, may_try=False)
        assert not choice.trying and (choice.threads.prefill, choice.threads.decode) == (2, 2)
        tuner.observe(choice, {PREFILL: 1.0, DECODE: 1.0})


def test_one_configured_thread_has_nothing_to_try():
    tuner = ThreadTuner(1)
    ran = run(tuner, contended, 100)
    assert not any(c.trying for c in ran)
    assert {(c.threads.prefill, c.threads.decode) for c in ran} == {(1, 1)}
