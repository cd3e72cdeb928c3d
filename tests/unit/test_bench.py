"""`quept bench` end to end on a tiny model saved as a Hugging Face folder, and its report."""

import json

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.bench import runner
from quept_core.bench.report import (
    SECTION_BEGIN,
    SECTION_END,
    markdown,
    plot,
    ratios,
    text_table,
    update_docs,
)
from quept_core.bench.runner import (
    BATCHES,
    BenchConfig,
    BenchResult,
    BenchRow,
    MixedSetRow,
    Speed,
    perplexity,
    resident_set_bytes,
    run_bench,
    switch_latency,
)
from quept_core.precision import Precision
from quept_core.runtime.engine import QueptEngine

MB = 2**20
CONFIG = BenchConfig(prompt_tokens=16, new_tokens=4, ppl_tokens=64, seqlen=32, switches=20, repeats=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    loaded = tiny_loaded()
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def test_bench_runs_every_row(folder):
    engines = []
    layouts = []  # the plans of every multi-row layout the engine built

    def make_engine(loaded):
        engine = QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu", max_running=32)
        build = engine._layout

        def spy(plans):
            layouts.append([plan.name for plan in plans])
            return build(plans)

        engine._layout = spy
        engines.append(engine)
        return engine

    result = run_bench(str(folder), make_engine, ["fp", "w4", "w3"], CONFIG, None, None)
    assert [(r.engine, r.precision) for r in result.rows] == [("hf", "fp"), ("quept", "fp"), ("quept", "w4"),
                                                              ("quept", "w3")]
    for row in result.rows:
        assert row.prefill_tok_s > 0 and row.decode_tok_s_b1 > 0 and row.decode_tok_s_b8 > 0
        assert row.decode_tok_s_b32 > 0 and row.rss_bytes > 0
        assert row.ppl is None and row.decode_ppl is None  # no text: random prompts
    assert result.rows[0].step_route is None
    assert all(row.step_route in ("native", "pytorch") for row in result.rows[1:])
    w4, w3 = result.rows[2], result.rows[3]
    assert w3.weight_bytes < w4.weight_bytes < result.rows[1].weight_bytes
    assert 0 < result.switch_ms["p50"] <= result.switch_ms["p99"]
    # The six uniform plans share one 8-bit head pack (and the norms are no pack).
    engine = engines[0]
    uniform = [engine.plan(Precision.uniform(b)) for b in engine.bit_config.bits]
    norms = engine.weight_bytes(uniform[0]) - sum(engine.cache.nbytes(k) for k in engine.pack_keys(uniform[0]))
    head = engine.cache.nbytes(("lm_head", 8))
    total = sum(engine.weight_bytes(p) for p in uniform)
    assert result.uniform_resident_bytes == total - 5 * head - 6 * norms
    assert any("llama.cpp" in note for note in result.notes)

    mixed = result.mixed_set
    assert mixed.plans == ["w8", "w6", "w4", "w3"] and mixed.sequences == 8
    assert mixed.one_set_tok_s > 0 and mixed.turns_tok_s > 0 and mixed.ratio > 0 and mixed.rss_bytes > 0
    assert mixed.step_route in ("native", "pytorch")
    # Each plan's packs once: less than the four plans' resident bytes summed (shared head and norms).
    assert mixed.weight_bytes < sum(engine.weight_bytes(engine.plan(p)) for p in mixed.plans)
    # The eight sequences decoded in one running set of all four plans, two rows each.
    assert sorted(["w8", "w6", "w4", "w3"] * 2) in [sorted(layout) for layout in layouts]

    encoded = json.loads(json.dumps(result.to_dict()))
    assert encoded == result.to_dict()
    assert set(encoded["rows"][0]) == {"engine", "precision", "prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b8",
                                       "decode_tok_s_b32", "weight_bytes", "rss_bytes", "step_route", "ppl",
                                       "decode_ppl"}
    assert encoded["mixed_set"]["ratio"] == pytest.approx(mixed.ratio)


def test_bench_needs_an_engine_that_runs_batches_of_32(folder):
    def make_engine(loaded):
        return QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu", max_running=16)

    with pytest.raises(ValueError, match="max_running"):
        run_bench(str(folder), make_engine, ["w4"], CONFIG, None, None)


def test_rounds_measure_one_batch_size_across_every_row_at_a_time(folder, monkeypatch):
    """Rows compared by a ratio are measured seconds apart: every row at batch 1, then every row at 8, ..."""
    calls = []

    def engine_speed(engine, plan, prompts, config, batch):
        calls.append((batch, plan.name))
        return Speed.at_batch(batch, 10.0 * len(calls), 5.0 if batch == 1 else None, "native")

    def hf_speed(model, prompts, config, batch):
        calls.append((batch, "hf"))
        return Speed.at_batch(batch, 1.0, 2.0 if batch == 1 else None)

    monkeypatch.setattr(runner, "engine_speed", engine_speed)
    monkeypatch.setattr(runner, "hf_speed", hf_speed)
    config = BenchConfig(prompt_tokens=16, new_tokens=4, switches=2, repeats=2, mixed_set=())

    def make_engine(loaded):
        return QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu", max_running=32)

    result = run_bench(str(folder), make_engine, ["w4", "w3"], config, None, None)
    assert calls == [(batch, name) for _ in range(2) for batch in BATCHES for name in ("hf", "w4", "w3")]
    w4 = result.rows[1]
    # Each figure is the row's best over the rounds: here its second round's (the fakes speed up every call).
    assert (w4.decode_tok_s_b1, w4.decode_tok_s_b8, w4.decode_tok_s_b32) == (110.0, 140.0, 170.0)
    assert w4.prefill_tok_s == 5.0 and result.rows[0].prefill_tok_s == 2.0


def test_a_measurement_at_one_batch_size_fills_only_its_figures():
    assert Speed.at_batch(8, 30.0) == Speed(decode_tok_s_b8=30.0)
    assert Speed.at_batch(1, 3.0, 40.0, "native") == Speed(40.0, 3.0, step_route="native")


def test_resident_set_is_positive():
    assert resident_set_bytes() > 0


def test_perplexity_follows_the_window_convention():
    loaded = tiny_loaded()
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = perplexity(lambda w: loaded.model(w).logits, tokens, 32)
        windows = tokens[:96].view(3, 32)
        logits = loaded.model(windows).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))
    assert got == pytest.approx(torch.exp(nll).item(), rel=1e-5)


def test_switch_latency_measures_resident_plans():
    loaded = tiny_loaded()
    engine = QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu")
    plans = [engine.plan("w4"), engine.plan("w8")]
    result = switch_latency(engine, plans, 10)
    builds = engine.cache.builds
    assert 0 < result["p50"] <= result["p99"]
    switch_latency(engine, plans, 10)
    assert engine.cache.builds == builds  # both plans stayed resident


def sample_result() -> BenchResult:
    rows = [BenchRow("hf", "fp", 100.0, 20.0, 80.0, 160.0, 4000 * MB, 5000 * MB, None, 30.0),
            BenchRow("quept", "fp", 110.0, 22.0, 88.0, 176.0, 4000 * MB, 6000 * MB, "native", 30.0),
            BenchRow("quept", "w8", 300.0, 40.0, 120.0, 200.0, 1500 * MB, 7000 * MB, "native", 30.5),
            BenchRow("quept", "w4", 400.0, 50.0, 160.0, 320.0, 1000 * MB, 8000 * MB, "native", 38.0),
            BenchRow("quept", "w3", 500.0, 45.0, 150.0, 300.0, 900 * MB, 8100 * MB, "pytorch", 60.0),
            BenchRow("llama.cpp", "q4_1", 300.0, 40.0, None, None, 900 * MB, 9000 * MB, None, 31.0)]
    mixed = MixedSetRow(["w8", "w4"], 4, 90.0, 60.0, 2000 * MB, 9500 * MB, "native")
    return BenchResult(rows, {"p50": 0.1, "p99": 0.5}, 2.0, 3000 * MB, 4000 * MB, ["a note"],
                       {"device": "cpu", "switches": 9}, mixed)


def test_report_gives_ratios_against_the_baseline_and_llama_cpp():
    result = sample_result()
    text = markdown(result, "quept bench", "plot.png")
    assert "| quept | w4 | 400.0 (4.00×) | 50.0 (2.50×) | 160.0 (2.00×) | 320.0 (2.00×) | 1000.0 | 8000.0 | native |" in text
    assert "| one set of 2 plans | 90.0 |" in text and "| per-plan batches in turns | 60.0 |" in text
    got = dict(ratios(result))
    assert got["w4 b1 / llama.cpp b1"] == pytest.approx(1.25)
    assert got["w3 b1 / w4 b1"] == pytest.approx(0.9) and got["w4 b1 / w8 b1"] == pytest.approx(1.25)
    assert got["w8 b1 / fp b1"] == pytest.approx(40 / 22)
    assert got["w3 b1 / w8 b1"] == pytest.approx(45 / 40)
    assert got["w4 prefill / llama.cpp prefill"] == pytest.approx(4 / 3)
    assert got["w4 b8 / w4 b1"] == pytest.approx(3.2) and got["w4 b32 / w4 b1"] == pytest.approx(6.4)
    assert got["mixed set / per-plan turns"] == pytest.approx(1.5)
    assert "| w4 b1 / llama.cpp b1 | 1.25× |" in text and "| mixed set / per-plan turns | 1.50× |" in text
    assert "0.75×" in text and "![" in text
    table = text_table(result)
    assert "a note" in table and "ratio w4 b1 / llama.cpp b1: 1.25×" in table and "one set 90.0 tok/s" in table


def test_plot_draws_every_row_and_the_mixed_set(tmp_path):
    path = tmp_path / "plot.png"
    plot(sample_result(), path)
    assert path.stat().st_size > 0


def test_docs_update_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Quality\n\nother colleague's table\n")
    update_docs(doc, "## Runtime\n\nfirst")
    update_docs(doc, "## Runtime\n\nsecond")
    text = doc.read_text()
    assert "other colleague's table" in text and "second" in text and "first" not in text
    assert text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1


def test_rounds_keep_each_figure_at_its_best():
    best = Speed(10.0, 5.0, None, 3.0, "native").best(Speed(8.0, 7.0, None, None, "native"))
    assert best == Speed(10.0, 7.0, None, 3.0, "native")
    mixed = MixedSetRow(["w8", "w4"], 4, 90.0, 50.0).best(MixedSetRow(["w8", "w4"], 4, 80.0, 60.0, rss_bytes=7))
    assert (mixed.one_set_tok_s, mixed.turns_tok_s, mixed.rss_bytes) == (90.0, 60.0, 7)
