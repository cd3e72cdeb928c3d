"""`quept bench` end to end on a tiny model saved as a Hugging Face folder, and its report."""

import json

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.bench.report import SECTION_BEGIN, SECTION_END, markdown, text_table, update_docs
from quept_core.bench.runner import (
    BenchConfig,
    BenchResult,
    BenchRow,
    Speed,
    perplexity,
    run_bench,
    switch_latency,
)
from quept_core.precision import Precision
from quept_core.runtime.engine import QueptEngine

CONFIG = BenchConfig(prompt_tokens=16, new_tokens=4, batch=8, ppl_tokens=64, seqlen=32, switches=20, repeats=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    loaded = tiny_loaded()
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def test_bench_runs_every_row(folder):
    engines = []

    def make_engine(loaded):
        engines.append(QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu"))
        return engines[0]

    result = run_bench(str(folder), make_engine, ["fp", "w4", "w3"], CONFIG, None, None)
    assert [(r.engine, r.precision) for r in result.rows] == [("hf", "fp"), ("quept", "fp"), ("quept", "w4"),
                                                              ("quept", "w3")]
    for row in result.rows:
        assert row.prefill_tok_s > 0 and row.decode_tok_s_b1 > 0 and row.decode_tok_s_b8 > 0
        assert row.ppl is None  # no text: random prompts
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
    encoded = json.loads(json.dumps(result.to_dict()))
    assert set(encoded) >= {"rows", "switch_ms", "reload_s"}
    assert set(encoded["rows"][0]) == {"engine", "precision", "prefill_tok_s", "decode_tok_s_b1",
                                       "decode_tok_s_b8", "weight_bytes", "ppl"}


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
    rows = [BenchRow("hf", "fp", 100.0, 20.0, 80.0, 4000, 30.0), BenchRow("quept", "w4", 400.0, 50.0, 160.0, 1000, 38.0),
            BenchRow("llama.cpp", "q4_1", 300.0, 40.0, None, 900, 31.0)]
    return BenchResult(rows, {"p50": 0.1, "p99": 0.5}, 2.0, 3000, 4000, ["a note"], {"device": "cpu", "switches": 9})


def test_report_gives_ratios_against_the_baseline_and_llama_cpp():
    text = markdown(sample_result(), "quept bench", "plot.png")
    assert "| quept | w4 | 400.0 (4.00×) | 50.0 (2.50×) | 160.0 (2.00×) |" in text
    assert "w4: decode 1.25×, prefill 1.33×" in text
    assert "0.75×" in text and "![" in text
    assert "a note" in text_table(sample_result())


def test_docs_update_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Quality\n\nother colleague's table\n")
    update_docs(doc, "## Runtime\n\nfirst")
    update_docs(doc, "## Runtime\n\nsecond")
    text = doc.read_text()
    assert "other colleague's table" in text and "second" in text and "first" not in text
    assert text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1


def test_rounds_keep_each_figure_at_its_best():
    best = Speed(10.0, 5.0, None).best(Speed(8.0, 7.0, None))
    assert best == Speed(10.0, 7.0, None)
