"""Per-block calibration checkpoints, so that an interrupted calibration resumes where it stopped.

Layout of the checkpoint folder (every file written atomically; `progress.json` is the commit point):
  block-<k>.safetensors   the trained LoRA factors and clip logits of block k
  chain-<k>.safetensors   the FP-chain and quantized-chain inputs of block k + 1
  end-to-end-<s>.safetensors  every linear's trained state after step s of the end-to-end stage
  end-to-end-<s>.pt       that stage's optimizer, schedule and per-step losses at step s
  progress.json           fingerprint, next block, current chain file, per-block records, end-to-end step
A folder whose fingerprint differs (other model, data or config) is cleared and calibration starts over.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from quept_core.io.atomic import save_tensors_atomic, write_bytes_atomic, write_json_atomic
from quept_core.quant.elastic import ElasticLinear, load_trainable_state, trainable_state

PROGRESS = "progress.json"


@dataclass
class Resumed:
    next_block: int
    x_fp: torch.Tensor
    x_q: torch.Tensor
    records: list[dict]  # BlockRecord.to_dict() of the finished blocks


def _block_file(k: int) -> str:
    return f"block-{k:03d}.safetensors"


def _chain_file(k: int) -> str:
    return f"chain-{k:03d}.safetensors"


def _end_to_end_files(step: int) -> tuple[str, str]:
    return f"end-to-end-{step:05d}.safetensors", f"end-to-end-{step:05d}.pt"


class CalibrationCheckpoint:
    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def load(self, elastic: dict[str, ElasticLinear], device: torch.device) -> Resumed | None:
        """Restore finished blocks into `elastic`; None (and a cleared folder) when nothing matches."""
        progress = self._progress()
        if progress.get("fingerprint") != self.fingerprint:
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        next_block = progress["next_block"]
        for k in range(next_block):
            prefix = f"model.layers.{k}."
            load_trainable_state({n: m for n, m in elastic.items() if n.startswith(prefix)},
                                 load_file(str(self.folder / _block_file(k))))
        chain = load_file(str(self.folder / progress["chain"]), device=str(device))
        return Resumed(next_block, chain["x_fp"], chain["x_q"], progress["records"])

    def _progress(self) -> dict:
        """The committed progress; empty when nothing was committed."""
        path = self.folder / PROGRESS
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_end_to_end(self, elastic: dict[str, ElasticLinear], tuning_state: dict) -> None:
        """Save the end-to-end stage after `tuning_state["step"]` steps (after every block is saved)."""
        progress = self._progress()
        state_file, tuning_file = _end_to_end_files(tuning_state["step"])
        save_tensors_atomic(self.folder / state_file, trainable_state(elastic))
        buffer = io.BytesIO()
        torch.save(tuning_state, buffer)
        write_bytes_atomic(self.folder / tuning_file, buffer.getvalue())
        previous = progress.get("end_to_end_step")
        write_json_atomic(self.folder / PROGRESS, {**progress, "end_to_end_step": tuning_state["step"]})
        if previous is not None and previous != tuning_state["step"]:
            for name in _end_to_end_files(previous):
                (self.folder / name).unlink(missing_ok=True)

    def load_end_to_end(self, elastic: dict[str, ElasticLinear]) -> dict | None:
        """Restore the last saved end-to-end step into `elastic` and return the stage's state; None when
        the stage has not saved a step."""
        step = self._progress().get("end_to_end_step")
        if step is None:
            return None
        state_file, tuning_file = _end_to_end_files(step)
        load_trainable_state(elastic, load_file(str(self.folder / state_file)))
        return torch.load(self.folder / tuning_file, weights_only=True)

    def save_block(self, k: int, block_elastic: dict[str, ElasticLinear], x_fp: torch.Tensor,
                   x_q: torch.Tensor, records: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(self.folder / _block_file(k), trainable_state(block_elastic))
        save_tensors_atomic(self.folder / _chain_file(k), {"x_fp": x_fp, "x_q": x_q})
        write_json_atomic(self.folder / PROGRESS, {
            "fingerprint": self.fingerprint,
            "next_block": k + 1,
            "chain": _chain_file(k),
            "records": records,
        })
        if k > 0:
            (self.folder / _chain_file(k - 1)).unlink(missing_ok=True)
