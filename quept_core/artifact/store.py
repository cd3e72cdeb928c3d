"""The calibrated artifact: LoRA factors and clip logits for every linear, bound to one base model.

An artifact is a folder:
  manifest.json        format version, base-model checksum, bit set, group sizes, ranks, calibration
                       config and seed, calibration data, library versions, file checksums, extras
  state.safetensors    per linear: lora_A, lora_B, clip_up.<b>, clip_low.<b>, input_scale (not the frozen
                       weights, which the manifest binds by the base model's checksum; loading folds the
                       input scales into them and into their inputs' producers)
  extras/<name>.json   further documents (sensitivity table, mixed-precision front), listed in the manifest

The folder is built under a temporary name and renamed into place, so a half-written artifact
is never loaded; every file is checked against its manifest checksum before use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quept_core.calibration.data import calibration_tokens
from quept_core.calibration.equalize import fold_input_scales
from quept_core.calibration.loop import CalibrationConfig, CalibrationResult, calibrate
from quept_core.config import BitConfig
from quept_core.io.atomic import file_lock, replacing_folder, write_bytes_atomic, write_json_atomic
from quept_core.io.models import LoadedModel
from quept_core.io.paths import cache_dir
from quept_core.quant.elastic import (
    ElasticLinear,
    elastic_linears,
    load_trainable_state,
    make_elastic,
    set_bits,
    trainable_state,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: input scales (activation-aware equalization) in the state
MANIFEST = "manifest.json"
STATE = "state.safetensors"
EXTRAS = "extras"
_EXTRA_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VERSIONED_PACKAGES = ("quept-serve", "torch", "transformers", "safetensors")


class ArtifactError(Exception):
    """An artifact is missing, incomplete, corrupt or made for another model; the message says what to run."""


@dataclass
class CalibratedModel:
    """A base model with its calibrated elastic linears swapped in (full precision until switched)."""

    loaded: LoadedModel
    bit_config: BitConfig
    elastic: dict[str, ElasticLinear]
    manifest: dict
    artifact_dir: Path

    @property
    def artifact_id(self) -> str:
        return artifact_id_of(self.manifest)


def artifact_id_of(manifest: dict) -> str:
    """A short content hash of an artifact's calibrated state."""
    return manifest["files"][STATE]["sha256"][:16]


def default_artifact_dir(model_name: str, preset: str) -> Path:
    return cache_dir() / "artifacts" / f"{model_name}-{preset}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _calibrate_hint(artifact_dir: Path, manifest: dict | None = None) -> str:
    model = (manifest or {}).get("model", {}).get("name")
    model_flag = f" --model {model}" if model else ""
    return f"run `quept calibrate{model_flag} --out {artifact_dir}`"


def save_artifact(out_dir: Path, elastic: dict[str, ElasticLinear], manifest: dict) -> Path:
    """Write `state.safetensors` and `manifest.json` to `out_dir` atomically (replacing an old one).

    `manifest` must hold `model` ({"name", "checksum"}) and `bit_config`; the format version, the
    file checksums and an empty extras listing are added here.
    """
    for key in ("model", "bit_config"):
        if key not in manifest:
            raise ValueError(f"save_artifact: manifest lacks '{key}'")
    with replacing_folder(out_dir) as staging:
        state_path = staging / STATE
        save_file(trainable_state(elastic), str(state_path))
        full = {**manifest, "format_version": FORMAT_VERSION, "extras": {},
                "files": {STATE: {"sha256": _sha256(state_path), "bytes": state_path.stat().st_size}}}
        write_json_atomic(staging / MANIFEST, full)
        with state_path.open("rb") as handle:
            os.fsync(handle.fileno())
    return Path(out_dir)


def read_manifest(artifact_dir: Path) -> dict:
    """The manifest of a complete artifact of this format version (ArtifactError otherwise)."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir():
        raise ArtifactError(f"{artifact_dir}: no calibrated artifact there; {_calibrate_hint(artifact_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ArtifactError(f"{path}: missing or unreadable, the artifact is incomplete; "
                            f"{_calibrate_hint(artifact_dir)}") from None
    found = manifest.get("format_version")
    if found != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {found}, this QuEPT-serve reads version {FORMAT_VERSION}; "
                            f"{_calibrate_hint(artifact_dir, manifest)}")
    return manifest


def _verify_file(artifact_dir: Path, entry: dict, relative: str, manifest: dict) -> Path:
    path = artifact_dir / relative
    if not path.is_file() or _sha256(path) != entry["sha256"]:
        raise ArtifactError(f"{path}: missing or checksum mismatch (corrupt or partly written); "
                            f"{_calibrate_hint(artifact_dir, manifest)}")
    return path


def verify_artifact(artifact_dir: Path, model_name: str, checksum: str, state: bool = True) -> dict:
    """Check the manifest, the binding to the base model (`model_name`, whose weights have sha256
    `checksum`; no need to load it) and every file checksum; returns the manifest. `state=False` leaves
    the calibrated state's file unread: serving reads only the extras and the serving store, which was
    written from a verified state and is bound to its hash."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    bound = manifest.get("model", {}).get("checksum")
    if bound != checksum:
        raise ArtifactError(
            f"{artifact_dir / MANIFEST}: calibrated for base model sha256 {str(bound)[:12]}, but "
            f"'{model_name}' is {checksum[:12]}; run `quept calibrate --model {model_name} "
            f"--out {artifact_dir}`")
    for relative, entry in manifest["files"].items():
        if state or relative != STATE:
            _verify_file(artifact_dir, entry, relative, manifest)
    for entry in manifest.get("extras", {}).values():
        _verify_file(artifact_dir, entry, entry["file"], manifest)
    return manifest


def _elastic_for(loaded: LoadedModel, bit_config: BitConfig, artifact_dir: Path) -> dict[str, ElasticLinear]:
    """The model's elastic linears: reused when already swapped in with this bit config, else created."""
    existing = elastic_linears(loaded.model)
    if not existing:
        return make_elastic(loaded.model, bit_config)
    if any(m.bit_config != bit_config for m in existing.values()):
        raise ArtifactError(f"{artifact_dir}: the model already carries elastic linears with another bit "
                            f"configuration; load a fresh base model before loading this artifact")
    return existing


def _same_input_scales(elastic: dict[str, ElasticLinear], state: dict[str, torch.Tensor]) -> bool:
    """Whether elastic linears already in a model carry the state's input scales (folded into their weights)."""
    return all(torch.equal(m.input_scale, state.get(f"{name}.input_scale", m.input_scale)) for name, m in elastic.items())


def load_artifact(artifact_dir: Path | str, loaded: LoadedModel) -> CalibratedModel:
    """Verify an artifact against `loaded` and swap its calibrated elastic linears into `loaded.model`."""
    artifact_dir = Path(artifact_dir)
    manifest = verify_artifact(artifact_dir, loaded.name, loaded.checksum)
    bit_config = BitConfig.from_dict(manifest["bit_config"])
    fresh = not elastic_linears(loaded.model)
    elastic = _elastic_for(loaded, bit_config, artifact_dir)
    device = loaded.model.get_input_embeddings().weight.device
    state = load_file(str(artifact_dir / STATE), device=str(device))
    if not fresh and not _same_input_scales(elastic, state):
        raise ArtifactError(f"{artifact_dir}: the model already carries weights equalized for another "
                            f"calibration; load a fresh base model before loading this artifact")
    try:
        load_trainable_state(elastic, state)
    except (KeyError, ValueError) as error:
        raise ArtifactError(f"{artifact_dir / STATE}: does not fit '{loaded.name}' ({error}); "
                            f"{_calibrate_hint(artifact_dir, manifest)}") from None
    if fresh:
        fold_input_scales(loaded.model.model.layers)
    set_bits(loaded.model, None)
    return CalibratedModel(loaded, bit_config, elastic, manifest, artifact_dir)


def _check_extra_name(name: str) -> None:
    if not _EXTRA_NAME.match(name):
        raise ValueError(f"extra name '{name}' is not allowed: use 1-64 of [a-z0-9_-], starting with a letter or digit")


def write_extra(artifact_dir: Path, name: str, obj: Any) -> None:
    """Store a JSON document in the artifact (atomically) and list it in the manifest with its checksum."""
    _check_extra_name(name)
    artifact_dir = Path(artifact_dir)
    read_manifest(artifact_dir)
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    relative = f"{EXTRAS}/{name}.json"
    (artifact_dir / EXTRAS).mkdir(exist_ok=True)
    # Serialise manifest updates between processes (two writers adding extras at once).
    with file_lock(artifact_dir / ".lock"):
        write_bytes_atomic(artifact_dir / relative, data)
        manifest = read_manifest(artifact_dir)
        manifest.setdefault("extras", {})[name] = {"file": relative, "sha256": hashlib.sha256(data).hexdigest()}
        write_json_atomic(artifact_dir / MANIFEST, manifest)


def read_extra(artifact_dir: Path, name: str) -> Any | None:
    """A JSON document stored with `write_extra`, or None when the artifact has none by that name."""
    _check_extra_name(name)
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    entry = manifest.get("extras", {}).get(name)
    if entry is None:
        return None
    path = _verify_file(artifact_dir, entry, entry["file"], manifest)
    return json.loads(path.read_text())


def build_manifest(loaded: LoadedModel, config: CalibrationConfig, result: CalibrationResult, data: dict) -> dict:
    """The manifest of a calibration run. Nothing in it depends on the clock, so the same seed and data give the same bytes."""
    return {
        "model": {"name": loaded.name, "checksum": loaded.checksum},
        "bits": list(config.bit_config.bits),
        "bit_config": config.bit_config.to_dict(),
        "calibration": {**config.to_dict(), "fingerprint": result.fingerprint,
                        "device": str(next(iter(result.elastic.values())).weight.device.type)},
        "data": data,
        "block_losses": [{"block": r.block, "first": r.first_loss, "last": r.last_loss} for r in result.records],
        "end_to_end": None if result.end_to_end is None else result.end_to_end.losses(),
        "versions": library_versions(),
    }


def partial_dir(out_dir: Path) -> Path:
    """Where an unfinished calibration for `out_dir` keeps its per-block checkpoints."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


def calibrate_artifact(loaded: LoadedModel, config: CalibrationConfig, out_dir: Path | str,
                       text_file: Path | str | None = None, progress: bool = True,
                       device: torch.device | str | None = None) -> CalibrationResult:
    """Calibrate `loaded.model` in place and write the artifact to `out_dir`, resuming an interrupted
    run for the same model, data and config. Returns the CalibrationResult."""
    out_dir = Path(out_dir)
    text_file = None if text_file is None else Path(text_file)
    tokens = calibration_tokens(loaded, text_file, n_samples=config.n_samples, seqlen=config.seqlen,
                                seed=config.seed, progress=progress)
    data = {"source": "text-file" if text_file is not None else "model-generated",
            "file": None if text_file is None else Path(text_file).name,
            "n_samples": config.n_samples, "seqlen": config.seqlen,
            "sha256": hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()}
    work = partial_dir(out_dir)
    result = calibrate(loaded.model, config, tokens, base_checksum=loaded.checksum, checkpoint_dir=work,
                       device=device, progress=progress)
    save_artifact(out_dir, result.elastic, build_manifest(loaded, config, result, data))
    shutil.rmtree(work, ignore_errors=True)
    return result


def ready_artifact(model_name: str, checksum: str, preset: str = "fast", state: bool = True) -> Path | None:
    """The default artifact folder of a base model when it is complete, bound to these weights and made
    with this version's `preset` settings; None (the reason logged) when it must be calibrated.
    `state` as in `verify_artifact`."""
    out_dir = default_artifact_dir(model_name, preset)
    try:
        manifest = verify_artifact(out_dir, model_name, checksum, state)
    except ArtifactError as error:
        if out_dir.exists():
            log.warning("recalibrating: %s", error)
        return None
    if _preset_settings(manifest["calibration"]) != _preset_settings(CalibrationConfig.from_preset(preset).to_dict()):
        log.warning("recalibrating: %s was made with other '%s' preset settings than this version's", out_dir, preset)
        return None
    return out_dir


def ensure_artifact(loaded: LoadedModel, preset: str = "fast", progress: bool = True) -> Path:
    """The default artifact folder for `loaded`, calibrated first (resuming if interrupted) when it is
    missing, incomplete, or made for another base model or format version. A calibration here leaves
    `loaded.model` calibrated in place; `load_artifact` then reuses its elastic linears."""
    ready = ready_artifact(loaded.name, loaded.checksum, preset)
    if ready is not None:
        return ready
    out_dir = default_artifact_dir(loaded.name, preset)
    if elastic_linears(loaded.model):
        raise ArtifactError(f"{out_dir}: needs calibration, but '{loaded.name}' already carries elastic linears; "
                            f"load a fresh base model")
    calibrate_artifact(loaded, CalibrationConfig.from_preset(preset), out_dir, progress=progress)
    return out_dir


def _preset_settings(calibration: dict) -> dict:
    """A manifest's calibration settings without what the run added (its fingerprint and device)."""
    return {k: v for k, v in calibration.items() if k not in ("fingerprint", "device")}
