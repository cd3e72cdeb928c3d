"""The serving store: what a serving process reads, on disk, so that it needs neither the transformers
model nor the float masters and LoRA factors of the calibrated artifact.

A store is a folder, written once per calibrated artifact and read lazily:
  manifest.json        format version, artifact id, base model (name, checksum), bit config, tied head,
                       the size of every file (written last: a folder without it is incomplete)
  config.json          the transformers config (dimensions, RoPE)
  packs-v<n>/<device>/ the engine's own packs of each width, added by it (runtime/packfiles.py)
  tokenizer/           the tokenizer (`save_pretrained`; served with runtime/tokenizer.py, no transformers)
  dense.safetensors    bf16 weights for `fp`: every linear, the head and, when untied, the embedding;
                       the RMSNorm weights as they are
  w<b>.safetensors     per bit-width b of the bit config: `<name>.codes` (uint8), `<name>.scale` and
                       `<name>.zero` (float32) of every linear and of the head, exactly as quantized

For SmolLM2-135M (bits 3-8) it takes about 1.1 GB of disk. Tensors are read through safetensors'
memory map when a pack is built and copied out, so only what gets packed is paged in, and nothing keeps
the map once the engine's pack cache holds the pack. A store of another format or artifact, or with a
file missing or of the wrong size, is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from quept_core.config import BitConfig
from quept_core.io.atomic import file_lock, replacing_folder, save_tensors_atomic, write_json_atomic
from quept_core.io.paths import cache_dir
from quept_core.layers import HEAD, linear_names
from quept_core.quant.grid import QuantizedWeight
from quept_core.runtime.model import CONFIG_KEYS
from quept_core.runtime.tokenizer import ServingTokenizer
from quept_core.runtime.weights import EMBEDDING, ServingWeights, group_size, norm_names

if TYPE_CHECKING:  # only the first start, which writes the store, has transformers loaded
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: scales rounded to float16 values (quant/grid.py); 3: the head on its own grid (runtime/weights.py)
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"
TOKENIZER = "tokenizer"
DENSE_DTYPE = torch.bfloat16


class StoreError(Exception):
    """A serving store is missing, incomplete, of another format or made for another artifact."""


def codes_file(bits: int) -> str:
    return f"w{bits}.safetensors"


def serving_store_dir(artifact_dir: Path) -> Path:
    """Where the serving store of an artifact folder lives in the cache (one per artifact folder)."""
    artifact_dir = Path(artifact_dir).resolve()
    key = hashlib.sha256(str(artifact_dir).encode()).hexdigest()[:8]
    return cache_dir() / "serving" / f"{artifact_dir.name}-{key}"


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_size
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def read_store_manifest(folder: Path, artifact_id: str | None = None) -> dict:
    """The manifest of a complete store of this format (for `artifact_id`, when given); StoreError otherwise."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise StoreError(f"{folder}: no serving store there, or an incomplete one (no readable manifest)") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{folder}: serving store format {manifest.get('format_version')}, this version "
                         f"reads format {FORMAT_VERSION}")
    if artifact_id is not None and manifest.get("artifact_id") != artifact_id:
        raise StoreError(f"{folder}: serving store of artifact {manifest.get('artifact_id')}, not {artifact_id}")
    for relative, size in manifest["files"].items():
        path = folder / relative
        if not path.is_file() or path.stat().st_size != size:
            raise StoreError(f"{path}: missing or not the size the store's manifest records (partly written)")
    return manifest


class ServingStore:
    """ServingWeights read lazily from a serving store folder (see the module docstring)."""

    def __init__(self, folder: Path | str, artifact_id: str | None = None):
        self.folder = Path(folder)
        self.manifest = read_store_manifest(self.folder, artifact_id)
        self.artifact_id: str = self.manifest["artifact_id"]
        self.model_name: str = self.manifest["model"]["name"]
        self.bit_config = BitConfig.from_dict(self.manifest["bit_config"])
        self.tied: bool = self.manifest["tied"]
        self.config = _model_config(self.folder)
        self._handles: dict[str, object] | None = None  # open files, inside `kept_open` only

    @contextmanager
    def kept_open(self) -> Iterator[None]:
        """Keep the files open while many packs are built (opening one costs about 1 ms); their memory
        maps close when the block ends."""
        with ExitStack() as stack:
            self._handles = {}
            stack.callback(setattr, self, "_handles", None)
            for file in self.manifest["files"]:
                if file.endswith(".safetensors"):
                    self._handles[file] = stack.enter_context(safe_open(self.folder / file, framework="pt"))
            yield

    def tokenizer(self) -> ServingTokenizer:
        return ServingTokenizer(self.folder / TOKENIZER)

    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        if bits not in self.bit_config.bits:
            raise ValueError(f"bits {bits} is not in the store's bit set {self.bit_config.bits}")
        codes, scale, zero = self._read(codes_file(bits), [f"{name}.codes", f"{name}.scale", f"{name}.zero"])
        return QuantizedWeight(codes, scale, zero, bits, group_size(self.bit_config, name, bits))

    def dense(self, name: str) -> torch.Tensor:
        return self._read(DENSE, [HEAD if name == EMBEDDING and self.tied else name])[0]

    def norm(self, name: str) -> torch.Tensor:
        return self._read(DENSE, [name])[0]

    def _read(self, file: str, keys: list[str]) -> list[torch.Tensor]:
        """Copies of `keys` from `file`: the memory map closes with the handle once the views are gone."""
        if self._handles is not None:
            return self._copies(self._handles[file], file, keys)
        with safe_open(self.folder / file, framework="pt") as handle:
            return self._copies(handle, file, keys)

    def _copies(self, handle, file: str, keys: list[str]) -> list[torch.Tensor]:
        try:
            return [handle.get_tensor(key).clone() for key in keys]
        except SafetensorError:
            missing = [key for key in keys if key not in handle.keys()]
            raise KeyError(f"{self.folder / file}: no weight {missing[0]}") from None


def _model_config(folder: Path):
    """The transformers config's values as attributes. AutoConfig imports modules that take about a
    second at every start; a config that lacks a value the runtime reads, or has a scaled RoPE (whose
    init functions read a real config), is read with it."""
    values = json.loads((folder / "config.json").read_text())
    if any(key not in values for key in CONFIG_KEYS) or values["rope_parameters"].get("rope_type") != "default":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder)
    return SimpleNamespace(**values)


def open_serving_store(folder: Path, artifact_id: str) -> ServingStore | None:
    """The store in `folder` when it is complete and made for `artifact_id`, else None (the reason logged)."""
    try:
        return ServingStore(folder, artifact_id)
    except StoreError as error:
        if Path(folder).exists():
            log.warning("rebuilding the serving store: %s", error)
        return None


def write_serving_store(folder: Path, weights: ServingWeights, tokenizer: PreTrainedTokenizerBase, *,
                        artifact_id: str, model_name: str, model_checksum: str,
                        progress: bool = True) -> ServingStore:
    """Write the store of `weights` (an artifact's `ElasticWeights`) to `folder` atomically, unless a
    complete one for `artifact_id` is already there (another process may have just written it)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.with_name(f".{folder.name}.lock")):
        existing = open_serving_store(folder, artifact_id)
        if existing is not None:
            return existing
        with replacing_folder(folder) as staging:
            _write(staging, weights, tokenizer, progress)
            write_json_atomic(staging / MANIFEST, {
                "format_version": FORMAT_VERSION, "artifact_id": artifact_id,
                "model": {"name": model_name, "checksum": model_checksum},
                "bit_config": weights.bit_config.to_dict(), "tied": weights.tied, "files": _file_sizes(staging)})
    return ServingStore(folder, artifact_id)


def _write(staging: Path, weights: ServingWeights, tokenizer: PreTrainedTokenizerBase, progress: bool) -> None:
    config, bits_set = weights.config, weights.bit_config.bits
    quantized = [*linear_names(config.num_hidden_layers), HEAD]
    dense_names = quantized if weights.tied else [*quantized, EMBEDDING]
    bar = tqdm(total=len(dense_names) + len(bits_set) * len(quantized), desc="serving store", unit="weight",
               disable=not progress)
    with torch.no_grad():
        dense = {name: weights.norm(name) for name in norm_names(config.num_hidden_layers)}
        for name in dense_names:
            dense[name] = weights.dense(name).to(DENSE_DTYPE)
            bar.update()
        save_tensors_atomic(staging / DENSE, dense)
        del dense
        for bits in bits_set:
            tensors = {}
            for name in quantized:
                weight = weights.quantized(name, bits)
                tensors |= {f"{name}.codes": weight.codes, f"{name}.scale": weight.scale, f"{name}.zero": weight.zero}
                bar.update()
            save_tensors_atomic(staging / codes_file(bits), tensors)
    bar.close()
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging / TOKENIZER)
