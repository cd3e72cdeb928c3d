"""Mixed-precision extras of a calibrated tiny artifact, and `quept eval` on all three methods."""

import json

import pytest
import torch
from tiny_lm import tiny_folder, tiny_text
from typer.testing import CliRunner

from quept_core.artifact.store import calibrate_artifact, load_artifact, read_extra
from quept_core.calibration.loop import CalibrationConfig
from quept_core.eval import plan_quality as quality
from quept_core.eval.perplexity import perplexity
from quept_core.io.models import load_model
from quept_core.layers import model_linear_names
from quept_core.planning.plan import uniform_plan
from quept_core.quant.sources import QueptWeights, dequantized_weights, use_weights
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


def test_plan_quality_is_the_plans_perplexity(artifact):
    model = calibrated(artifact)
    tokens = torch.randint(0, 127, (2, 24), generator=torch.Generator().manual_seed(5))
    plan = uniform_plan(model_linear_names(model.loaded.model), 4)
    result = quality.measure_plan_quality(model, [plan], tokens)
    with use_weights(model.loaded.model, dequantized_weights(QueptWeights(model.elastic), plan.layer_bits)):
        expected = perplexity(model.loaded.model, tokens).ppl
    assert result["w4"]["ppl"] == pytest.approx(expected)
    assert result["fp"]["ppl"] == pytest.approx(perplexity(model.loaded.model, tokens).ppl)


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
        ("fp", "fp"), ("quept", "w4"), ("quept", "mixed:5.00"), ("rtn", "w4"), ("rtn", "mixed:5.00"),
        ("gptq", "w4"), ("gptq", "mixed:5.00")]
    for row in rows[1:]:
        limit = 5.0 if row["precision"] == "mixed:5.00" else 4.375
        assert row["storage_bits"] <= limit + 1e-9
        assert row["ppl"] > 1.0


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
