"""The artifact: atomic save, verified load, refusal messages, extras, reproducible bytes, ensure."""

import dataclasses
import json

import pytest
import torch

from quept_core.artifact import store as artifact_module
from quept_core.artifact.store import (
    FORMAT_VERSION,
    ArtifactError,
    calibrate_artifact,
    default_artifact_dir,
    ensure_artifact,
    load_artifact,
    partial_dir,
    read_extra,
    save_artifact,
    verify_artifact,
    write_extra,
)
from quept_core.calibration.loop import CalibrationConfig
from quept_core.quant.elastic import set_bits
from tests.unit.tiny_llama import tiny_loaded

CONFIG = CalibrationConfig(n_samples=4, seqlen=32, batch_size=2, clip_search_grid=4, clip_search_samples=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calibration_text(monkeypatch):
    """Calibration tokens without generating text (the tiny tokenizer has no chat template)."""
    def tokens(loaded, text_file=None, n_samples=16, seqlen=512, seed=0, progress=False):
        return torch.randint(0, 256, (n_samples, seqlen), generator=torch.Generator().manual_seed(seed))

    monkeypatch.setattr(artifact_module, "calibration_tokens", tokens)


@pytest.fixture
def calibrated(tmp_path, calibration_text):
    loaded = tiny_loaded()
    calibrate_artifact(loaded, CONFIG, tmp_path / "art", progress=False)
    return loaded, tmp_path / "art"


def _logits(model, bits):
    set_bits(model, bits)
    with torch.no_grad():
        return model(torch.arange(24).reshape(2, 12)).logits


def test_load_gives_the_calibrated_model_back(calibrated):
    loaded, folder = calibrated
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "state.safetensors"]
    assert not partial_dir(folder).exists()
    fresh = load_artifact(folder, tiny_loaded())
    assert fresh.bit_config.bits == (3, 4, 5, 6, 7, 8)
    assert len(fresh.elastic) == 14 and len(fresh.artifact_id) == 16
    assert any(not torch.equal(m.input_scale, torch.ones_like(m.input_scale)) for m in fresh.elastic.values())
    for bits in (3, 6, 8, None):
        assert torch.equal(_logits(fresh.loaded.model, bits), _logits(loaded.model, bits)), bits


def test_a_model_equalized_for_another_calibration_is_refused(calibrated, tmp_path):
    loaded, folder = calibrated
    other = tmp_path / "other"
    calibrate_artifact(tiny_loaded(), dataclasses.replace(CONFIG, seed=1), other, progress=False)
    with pytest.raises(ArtifactError, match="equalized for another calibration; load a fresh base model"):
        load_artifact(other, loaded)
    assert torch.equal(_logits(load_artifact(folder, loaded).loaded.model, 3), _logits(loaded.model, 3))


def test_manifest_records_what_binds_and_reproduces_the_artifact(calibrated):
    loaded, folder = calibrated
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model"]["checksum"] == loaded.checksum
    assert manifest["bits"] == [3, 4, 5, 6, 7, 8]
    assert manifest["bit_config"]["tier_ranks"] == [32, 24, 0, 0]
    assert manifest["bit_config"]["group_sizes"]["3"] == 64
    assert manifest["calibration"]["seed"] == 0 and manifest["calibration"]["n_samples"] == 4
    assert set(manifest["versions"]) >= {"torch", "transformers", "safetensors"}
    assert len(manifest["files"]["state.safetensors"]["sha256"]) == 64
    assert len(manifest["data"]["sha256"]) == 64


def test_same_seed_and_data_give_the_same_bytes(calibrated, tmp_path):
    _, first = calibrated
    calibrate_artifact(tiny_loaded(), CONFIG, tmp_path / "again", progress=False)
    for name in ("state.safetensors", "manifest.json"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_other_base_model_is_refused(calibrated):
    _, folder = calibrated
    other = tiny_loaded(seed=1)
    other.checksum = "f" * 64
    with pytest.raises(ArtifactError, match=r"manifest.json: calibrated for base model .* run `quept calibrate"):
        load_artifact(folder, other)


def test_other_format_version_is_refused(calibrated):
    _, folder = calibrated
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}, this QuEPT-serve reads"):
        load_artifact(folder, tiny_loaded())


def test_corrupt_or_half_written_artifacts_are_never_loaded(calibrated):
    _, folder = calibrated
    data = bytearray((folder / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"state.safetensors: missing or checksum mismatch"):
        load_artifact(folder, tiny_loaded())
    # Serving reads only the manifest and the extras: it skips hashing the state it never reads.
    manifest = json.loads((folder / "manifest.json").read_text())
    assert verify_artifact(folder, "tiny", manifest["model"]["checksum"], state=False) == manifest
    write_extra(folder, "front", [])
    (folder / "extras" / "front.json").write_text("[1]")
    with pytest.raises(ArtifactError, match=r"front.json: missing or checksum mismatch"):
        verify_artifact(folder, "tiny", manifest["model"]["checksum"], state=False)
    (folder / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest.json: missing or unreadable, the artifact is incomplete"):
        load_artifact(folder, tiny_loaded())
    with pytest.raises(ArtifactError, match="no calibrated artifact there; run `quept calibrate"):
        load_artifact(folder.parent / "absent", tiny_loaded())


def test_save_replaces_an_existing_artifact_whole(calibrated):
    loaded, folder = calibrated
    manifest = json.loads((folder / "manifest.json").read_text())
    write_extra(folder, "plans", {"old": True})
    save_artifact(folder, load_artifact(folder, loaded).elastic, {**manifest, "note": "second"})
    assert json.loads((folder / "manifest.json").read_text())["note"] == "second"
    assert read_extra(folder, "plans") is None
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_extras_are_stored_listed_and_verified(calibrated):
    _, folder = calibrated
    table = {"sensitivity": [[0.1, 0.2], [0.3, 0.4]], "bits": [3, 4]}
    write_extra(folder, "sensitivity", table)
    write_extra(folder, "front", [{"avg_bits": 3.5}])
    assert read_extra(folder, "sensitivity") == table
    assert read_extra(folder, "missing") is None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["extras"]) == {"sensitivity", "front"}
    load_artifact(folder, tiny_loaded())  # extras keep the artifact loadable
    (folder / "extras" / "front.json").write_text("[]")
    with pytest.raises(ArtifactError, match=r"front.json: missing or checksum mismatch"):
        read_extra(folder, "front")
    with pytest.raises(ValueError, match="extra name '../x' is not allowed"):
        write_extra(folder, "../x", {})


def test_ensure_artifact_calibrates_once_then_reuses(tmp_path, monkeypatch, calibration_text):
    monkeypatch.setenv("QUEPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(CalibrationConfig, "from_preset", classmethod(lambda cls, name, **kw: CONFIG))
    loaded = tiny_loaded()
    folder = ensure_artifact(loaded, preset="fast", progress=False)
    assert folder == default_artifact_dir("tiny", "fast") and folder.parent == tmp_path / "artifacts"
    calibrated = load_artifact(folder, loaded)  # reuses the elastic linears calibrated in place
    assert torch.equal(_logits(calibrated.loaded.model, 4), _logits(load_artifact(folder, tiny_loaded()).loaded.model, 4))

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(artifact_module, "calibrate_artifact", no_calibration)
    assert ensure_artifact(tiny_loaded(), preset="fast", progress=False) == folder
    changed = dataclasses.replace(CONFIG, lora_lr=CONFIG.lora_lr / 2)  # a new version's preset
    monkeypatch.setattr(CalibrationConfig, "from_preset", classmethod(lambda cls, name, **kw: changed))
    with pytest.raises(AssertionError, match="calibrated again"):
        ensure_artifact(tiny_loaded(), preset="fast", progress=False)
    monkeypatch.setattr(CalibrationConfig, "from_preset", classmethod(lambda cls, name, **kw: CONFIG))
    (folder / "manifest.json").unlink()
    with pytest.raises(AssertionError, match="calibrated again"):
        ensure_artifact(tiny_loaded(), preset="fast", progress=False)
