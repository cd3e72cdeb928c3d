"""How many CPU threads each phase of an engine step runs on, chosen from how fast steps run now.

PyTorch's thread count (one per core) is the fastest on a quiet host, for prefill above all: its dense
matmul gains about 1.7x from the second core here. When other work competes for the cores (another
job, a load generator, the server's own HTTP side), a parallel region waits at each barrier for
whichever of its threads the kernel preempted, and one thread does more. On this 2-core host, with two
busy loops running, the server's prefill took about a third of the time per token on one thread, and
the engine alone 0.73-0.90x (`benchmarks/threads_under_contention.py`; docs/controller.md, "Threads
under contention").

So for prefill and decode apart, the tuner runs the phase on a chosen count (PyTorch's at first) and
now and then tries the other (one, or back): every EXPLORE_EVERY-th step of the phase (twice as far
apart after each try that lost by 1.5x or more, up to MAX_EXPLORE_EVERY), and at once when the chosen
count's recent speed moved by HOST_CHANGE since the latest try (the host changed). Speed is
the cost model's ratio of a step's measured over modelled seconds, which puts steps of any size on one
scale; a try is scored against the chosen count's median ratio of the steps just before it, so both
sides see the same host. Two tries in a row at 1.5x the speed leave the configured count; two no
slower return to it. Steps that try the other count teach the cost model nothing (the scheduler's
`learn=False`): the host factor describes the host as the chosen counts run on it.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from quept_core.runtime.protocol import StepThreads
from service.engine.costs import DECODE, PREFILL

WINDOW = 5  # latest ratios of the chosen count whose median a try is compared with
EXPLORE_EVERY = 16  # steps of a phase on the chosen count between two tries of the other...
MAX_EXPLORE_EVERY = 128  # ...doubling up to this while the tries lose by 1.5x or more (a steady host)
HOST_CHANGE = 1.5  # the chosen count's median moved this many times since the last try: try again now
SWITCH_BELOW = 0.67  # two tries in a row under this share of the chosen count's ratio leave the configured count
RETURN_BELOW = 1.05  # and under this share (at par), return to it: leave it only for a clear gain


@dataclass(frozen=True)
class ThreadChoice:
    """The threads of one step, and whether a phase of it tries the count not chosen."""

    threads: StepThreads
    trying: bool = False


@dataclass
class _Phase:
    configured: int
    other: int | None  # None: one count only
    chosen: int = 0
    ratios: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))  # the chosen count's
    since_tried: int = 0
    interval: int = EXPLORE_EVERY  # steps between scheduled tries
    tried_at: float | None = None  # the chosen count's median at the latest try
    tries: deque[float] = field(default_factory=lambda: deque(maxlen=2))  # each try's ratio over that median

    def __post_init__(self) -> None:
        self.chosen = self.configured

    @property
    def threshold(self) -> float:
        return SWITCH_BELOW if self.chosen == self.configured else RETURN_BELOW

    def due(self) -> bool:
        if self.other is None or not self.ratios:
            return False
        if self.since_tried >= self.interval or (self.tries and self.tries[-1] < self.threshold):
            return True  # on schedule, or to confirm a try that beat the chosen count
        change = statistics.median(self.ratios) / self.tried_at if self.tried_at else 1.0
        return not 1 / HOST_CHANGE < change < HOST_CHANGE

    def observe(self, threads: int, ratio: float) -> bool:
        if threads == self.chosen:
            self.ratios.append(ratio)
            self.since_tried += 1
            return False
        if not self.ratios:
            return False
        self.tried_at = statistics.median(self.ratios)
        self.tries.append(ratio / self.tried_at)
        self.since_tried = 0
        clearly_slower = self.tries[-1] * SWITCH_BELOW >= 1
        self.interval = min(2 * self.interval, MAX_EXPLORE_EVERY) if clearly_slower else EXPLORE_EVERY
        if len(self.tries) < 2 or max(self.tries) >= self.threshold:
            return False
        self.chosen, self.other = threads, self.chosen
        self.ratios = deque([ratio], maxlen=WINDOW)
        self.tries.clear()
        self.tried_at = None
        return True


class ThreadTuner:
    def __init__(self, threads: int):
        other = 1 if threads > 1 else None
        self._phases = {PREFILL: _Phase(threads, other), DECODE: _Phase(threads, other)}

    @property
    def chosen(self) -> dict[str, int]:
        return {name: phase.chosen for name, phase in self._phases.items()}

    def next_step(self, prefill: bool, decode: bool, may_try: bool = True) -> ThreadChoice:
        """The threads of a step that runs these phases; `may_try=False` keeps it on the chosen counts (a
        step that re-measures a width's cost must run as the others do)."""
        threads = self.chosen
        due = [name for name, runs in ((PREFILL, prefill), (DECODE, decode)) if runs and self._phases[name].due()]
        if may_try and due:
            name = due[0]  # one phase at a time: the other keeps the step's time close to the model
            threads[name] = self._phases[name].other
        return ThreadChoice(StepThreads(threads[PREFILL], threads[DECODE]), trying=may_try and bool(due))

    def observe(self, choice: ThreadChoice, ratios: Mapping[str, float]) -> bool:
        """A step's measured over modelled seconds per phase (`CostModel.observe`), run as `choice` said.
        Returns whether a phase's chosen count changed."""
        switched = False
        for name, ratio in ratios.items():
            threads = choice.threads.prefill if name == PREFILL else choice.threads.decode
            switched |= self._phases[name].observe(threads, ratio)
        return switched
