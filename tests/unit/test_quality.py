"""Mixed-precision extras of a calibrated tiny artifact, and `quept eval` on all three methods."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import tiny_folder, tiny_text
from typer.testing import CliRunner

from quept_core.artifact.store import calibrate_artifact, load_artifact, read_extra
from quept_core.calibration.loop import CalibrationConfig
from quept_core.eval import plan_quality as quality
from quept_core.eval.perplexity import perplexity
from quept_core.io.models import load_model
from quept_core.runtime.engine import QueptEngine
from service.cli import app

CONFIG = CalibrationConfig(n_samples=4, seqlen=32, batch_size=2, clip_search_grid=4, clip_search_samples=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids hand-off costs that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    model_dir = tiny_folder(root / "model")
    text = tiny_text(root / "calib.txt", words=2000)
    calibrate_artifact(load_model(str(model_dir)), CONFIG, root / "artifact", text_file=text, progress=False)
    return model_dir, root / "artifact", text


def calibrated(artifact):
    model_dir, folder, _ = artifact
    return load_artifact(folder, load_model(str(model_dir)))


def test_extras_are_computed_once_and_stored(artifact, monkeypatch):
    _, folder, text = artifact
    model = calibrated(artifact)
    extras = quality.ensure_mixed_extras(folder, model, text)
    assert read_extra(folder, "sensitivity") == extras["sensitivity"]
    assert read_extra(folder, "plans") == extras["plans"]
    assert read_extra(folder, "quality") == extras["quality"]
    names = [p["name"] for p in extras["plans"]["points"]]
    assert names and all(n.startswith("mixed:") for n in names)
    measured = extras["quality"]["plans"]
    assert set(measured) == {"fp", "w3", "w4", "w5", "w6", "w7", "w8", *names}
    assert measured["fp"]["ppl_delta_pct"] == 0.0 and measured["fp"]["storage_bits"] == 16.0
    for entry in measured.values():
        assert entry["ppl_delta_pct"] == pytest.approx(100 * (entry["ppl"] / measured["fp"]["ppl"] - 1))

    def refuse(*_args, **_kwargs):
        raise AssertionError("stored extras must not be recomputed")

    monkeypatch.setattr(quality, "proxy_sensitivity", refuse)
    monkeypatch.setattr(quality, "plan_quality", refuse)
    assert quality.ensure_mixed_extras(folder, calibrated(artifact), text) == extras


def test_held_out_windows_are_not_calibration_windows(artifact):
    _, _, text = artifact
    model = calibrated(artifact)
    calib = quality.calibration_data(model.loaded, model.manifest, text)
    held_out = quality.held_out_tokens(model.loaded, model.manifest, calib, text)
    assert held_out.shape[1] == CONFIG.seqlen and held_out.numel() <= quality.QUALITY_TOKENS
    assert not {tuple(r.tolist()) for r in held_out} & {tuple(r.tolist()) for r in calib}


def test_plan_quality_is_measured_on_the_serving_engine(artifact):
    model = calibrated(artifact)
    tokens = torch.randint(0, 127, (2, 24), generator=torch.Generator().manual_seed(5))
    engine = QueptEngine.from_calibrated(model)
    plan = engine.plan("w4")
    result = quality.plan_quality(engine, [plan], tokens)

    def served_ppl(served):
        logits = engine.logits(tokens, served)[:, :-1]
        return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                        tokens[:, 1:].reshape(-1)).item())

    assert result["w4"]["ppl"] == pytest.approx(served_ppl(plan), rel=1e-6)
    assert result["w4"]["lm_head_bits"] == engine.head_bits
    assert result["fp"]["ppl"] == pytest.approx(served_ppl(engine.plan("fp")), rel=1e-6)
    # The engine's bf16 fp plan is the float model up to bf16 rounding.
    assert result["fp"]["ppl"] == pytest.approx(perplexity(model.loaded.model, tokens).ppl, rel=0.02)
    assert result["w4"]["ppl_delta_pct"] == pytest.approx(100 * (result["w4"]["ppl"] / result["fp"]["ppl"] - 1))


def test_quality_interval_follows_the_spread_of_the_loss(artifact):
    """Identical plans: no difference and no interval; a plan at another width: an interval > 0 that
    shrinks with more tokens."""
    engine = QueptEngine.from_calibrated(calibrated(artifact))
    generator = torch.Generator().manual_seed(7)
    few = torch.randint(0, 127, (2, 3 * quality.QUALITY_CHUNK + 1), generator=generator)
    many = torch.randint(0, 127, (8, 3 * quality.QUALITY_CHUNK + 1), generator=generator)
    same = quality.plan_quality(engine, [engine.plan("w8").with_head_bits(None)], few)["w8"]
    low_few = quality.plan_quality(engine, [engine.plan("w3")], few)["w3"]
    low_many = quality.plan_quality(engine, [engine.plan("w3")], many)["w3"]
    assert low_few["ppl_delta_interval_pct"] > 0 and low_many["ppl_delta_interval_pct"] > 0
    assert low_many["ppl_delta_interval_pct"] < low_few["ppl_delta_interval_pct"]
    assert abs(same["ppl_delta_pct"]) < low_few["ppl_delta_interval_pct"]


def test_text_file_artifact_needs_its_text(artifact):
    model = calibrated(artifact)
    with pytest.raises(quality.ArtifactError, match="calibrated on the text file 'calib.txt'"):
        quality.calibration_data(model.loaded, model.manifest)


def test_eval_compares_all_methods_on_uniform_and_mixed_rows(artifact, tmp_path):
    model_dir, folder, text = artifact
    evaluation = tiny_text(tmp_path / "eval.txt", words=300, seed=9)
    result = CliRunner().invoke(app, [
        "eval", "--text", str(evaluation), "--model", str(model_dir), "--artifact", str(folder),
        "--calib-text", str(text), "--method", "quept,rtn,gptq", "--precision", "fp,w4,mixed:5",
        "--seqlen", "32", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["method"], r["precision"]) for r in rows] == [
        ("fp", "fp"), ("quept", "fp"), ("quept", "w4"), ("quept", "mixed:5.00"), ("rtn", "w4"),
        ("rtn", "mixed:5.00"), ("gptq", "w4"), ("gptq", "mixed:5.00")]
    for row in rows[2:]:
        limit = 5.0 if row["precision"] == "mixed:5.00" else 4.375
        assert row["storage_bits"] <= limit + 1e-9
        assert row["ppl"] > 1.0
    assert all(r["note"].startswith("serving engine: bfloat16 packs") for r in rows if r["method"] == "quept")
    assert "fp output head" in rows[1]["note"] and "8-bit output head" in rows[2]["note"]


def test_eval_scores_quept_rows_on_the_engine_or_on_the_reference_path(artifact, tmp_path):
    model_dir, folder, text = artifact
    evaluation = tiny_text(tmp_path / "eval.txt", words=300, seed=9)
    base = ["eval", "--text", str(evaluation), "--model", str(model_dir), "--artifact", str(folder),
            "--calib-text", str(text), "--method", "quept", "--precision", "fp,w8,w3", "--seqlen", "32", "--json"]
    by_path = {}
    for path in ("engine", "reference"):
        result = CliRunner().invoke(app, [*base, "--quept-path", path])
        assert result.exit_code == 0, result.output
        by_path[path] = {(r["method"], r["precision"]): r["ppl"] for r in json.loads(result.stdout)["results"]}
    engine, reference = by_path["engine"], by_path["reference"]
    assert set(reference) == {("fp", "fp"), ("quept", "w8"), ("quept", "w3")}
    assert set(engine) == set(reference) | {("quept", "fp")}
    # Same weights, another path: bf16 rounding and the 8-bit head move the figures a little, not a lot.
    assert engine[("quept", "fp")] == pytest.approx(reference[("fp", "fp")], rel=0.03)
    for row in (("quept", "w8"), ("quept", "w3")):
        assert engine[row] != reference[row] and engine[row] == pytest.approx(reference[row], rel=0.1)
    refused = CliRunner().invoke(app, [*base, "--quept-path", "gpu"])
    assert refused.exit_code == 2 and "--quept-path must be one of engine, reference" in refused.stderr


def test_plan_command_shows_the_front_and_a_resolved_plan(artifact):
    model_dir, folder, text = artifact
    base = ["plan", "--model", str(model_dir), "--artifact", str(folder), "--calib-text", str(text)]
    table = CliRunner().invoke(app, base)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert "held-out calibration tokens" in lines[0]
    assert [line.split()[0] for line in lines[2:4]] == ["fp", "w3"]
    bits = [float(line.split()[1]) for line in lines[3:]]
    assert bits == sorted(bits) and len(bits) > 6
    chosen = CliRunner().invoke(app, [*base, "--bits", "5", "--json"])
    assert chosen.exit_code == 0, chosen.output
    data = json.loads(chosen.stdout)
    assert data["name"] == "mixed:5.00"
    assert set(data["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    refused = CliRunner().invoke(app, [*base, "--bits", "3"])
    assert refused.exit_code == 2 and "below the cheapest plan" in refused.stderr
