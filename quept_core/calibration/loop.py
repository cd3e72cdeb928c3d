"""QuEPT one-shot multi-bit calibration: block-wise reconstruction for every bit-width at once (§5).

For each decoder block, in order:
1. the full-precision target: one plain FP forward pass on the FP-chain input;
2. activation-aware equalization: input channels rescaled, shared by every bit (`equalize.py`);
   then the clip logits start from a per-group clip-ratio grid search (`clip_search.py`), those of
   a width of one group per row from no shrink;
3. training: every step draws one bit per tier, sums the tiers' token-mean L1 losses against the
   FP target on the quantized-chain input, and takes one backward pass and one Adam step on the
   block's LoRA factors and clip logits (cosine decay to lr / min_lr_factor);
4. the next block's quantized-chain input is the MB-ToMe merge of the trained block's tier outputs.

Then, once, the end-to-end stage (`end_to_end.py`): the whole model's next-token distribution at the
low tiers' widths against the float model's, training the shared LoRA factors and those tiers' clips.

With a checkpoint folder, every finished block (and every few end-to-end steps) is saved there and an
interrupted run resumes after the last save, giving the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quept_core.calibration.checkpoint import CalibrationCheckpoint
from quept_core.calibration.clip_search import clip_ratios, init_clips, input_grams, start_unclipped
from quept_core.calibration.end_to_end import (
    END_TO_END_DTYPES,
    EndToEndRecord,
    EndToEndTuning,
    tune_end_to_end,
)
from quept_core.calibration.equalize import alphas, equalize_block, fold_input_scales
from quept_core.calibration.tome import default_tome_weights, merge_tiers
from quept_core.calibration.training import cosine_factor, trained
from quept_core.config import BitConfig
from quept_core.quant.elastic import ElasticLinear, elastic_linears, make_elastic, set_bits
from quept_core.quant.grid import storage_bits_per_weight

PRESETS = ("fast", "default")
# End-to-end steps between two checkpoints of the stage (each holds the state and its Adam moments).
END_TO_END_CHECKPOINT_EVERY = 8


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate. `CalibrationConfig.from_preset("fast")` gives the sized presets."""

    preset: str = "default"
    bit_config: BitConfig = field(default_factory=BitConfig)
    n_samples: int = 16  # calibration sequences
    seqlen: int = 512  # tokens per sequence
    epochs: int = 1
    batch_size: int = 1  # sequences per optimizer step
    lora_lr: float = 1e-3
    clip_lr: float = 1e-2
    min_lr_factor: float = 100.0  # cosine decay to lr / min_lr_factor
    tome_ratio: float = 0.5  # share of tokens that keep the high-bit output
    tome_weights: tuple[float, ...] | None = None  # λ per tier, low -> high; None: default_tome_weights
    clip_search: bool = True
    clip_search_samples: int = 4  # sequences whose inputs feed the equalization and the clip-ratio search
    clip_search_grid: int = 20  # shrink ratios tried: 1.0, 0.975, ... (steps of 0.025)
    # Whether a width of one group per row (8 bits) starts from the clip search too, or from no shrink:
    # rounded, it is already lossless, and its search over whole rows is a fifth of the fast preset's
    # time; the fast preset leaves it out (docs/benchmarks.md, "Calibration time").
    search_row_clips: bool = True
    # The widths whose clip search refines the max's and the min's ratio one at a time after the symmetric
    # search; None: the bits of the two lowest tiers (docs/benchmarks.md, "Asymmetric clip search");
    # (): symmetric everywhere, as before.
    asymmetric_clip_bits: tuple[int, ...] | None = None
    equalize: bool = True  # activation-aware input scaling before the clip search
    # The widths whose output error the scale search minimises (one scale serves every width); None: the
    # bits of the two lowest tiers, where equalization matters. Adding 8 bits measured worse at 4 bits and
    # searches its per-row grid on the full Gram matrix (docs/benchmarks.md, "Activation-aware equalization").
    equalize_bits: tuple[int, ...] | None = None
    equalize_grid: int = 20  # exponents tried: 0, 0.05, ... (steps of 0.05)
    # End-to-end tuning after the block loop (end_to_end.py): optimizer steps (0: none) and learning rates.
    end_to_end_steps: int = 32  # two passes over the default preset's 16 sequences
    end_to_end_lora_lr: float = 5e-4
    end_to_end_clip_lr: float = 1e-2
    # The stage's quantized forward and backward passes run their matmuls in this dtype (autocast; the
    # float model's distribution stays float32): bfloat16, as the engine serves, takes the fast preset's
    # stage from 65 to 51 s on this CPU at the same quality (docs/benchmarks.md, "End-to-end tuning").
    end_to_end_dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"n_samples": self.n_samples, "seqlen": self.seqlen, "epochs": self.epochs,
                    "batch_size": self.batch_size, "clip_search_samples": self.clip_search_samples,
                    "clip_search_grid": self.clip_search_grid}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibrationConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.equalize_grid, int) or not 1 <= self.equalize_grid <= 20:
            raise ValueError(f"CalibrationConfig.equalize_grid must be in 1..20, got {self.equalize_grid!r}")
        if self.equalize_bits is not None and (
                not self.equalize_bits or not set(self.equalize_bits) <= set(self.bit_config.bits)):
            raise ValueError(f"CalibrationConfig.equalize_bits must be a non-empty subset of the bit set "
                             f"{self.bit_config.bits}, got {self.equalize_bits!r}")
        if self.asymmetric_clip_bits is not None and not set(self.asymmetric_clip_bits) <= set(self.bit_config.bits):
            raise ValueError(f"CalibrationConfig.asymmetric_clip_bits must be a subset of the bit set "
                             f"{self.bit_config.bits}, got {self.asymmetric_clip_bits!r}")
        if self.clip_search_grid >= 40:
            raise ValueError(f"CalibrationConfig.clip_search_grid must be in 1..39, got {self.clip_search_grid}")
        if not isinstance(self.end_to_end_steps, int) or self.end_to_end_steps < 0:
            raise ValueError(f"CalibrationConfig.end_to_end_steps must be an integer >= 0, got {self.end_to_end_steps!r}")
        if self.end_to_end_dtype not in END_TO_END_DTYPES:
            raise ValueError(f"CalibrationConfig.end_to_end_dtype must be one of {', '.join(END_TO_END_DTYPES)}, "
                             f"got {self.end_to_end_dtype!r}")
        for name in ("lora_lr", "clip_lr", "end_to_end_lora_lr", "end_to_end_clip_lr"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"CalibrationConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.min_lr_factor >= 1.0:
            raise ValueError(f"CalibrationConfig.min_lr_factor must be >= 1, got {self.min_lr_factor!r}")
        if not 0.0 <= self.tome_ratio <= 1.0:
            raise ValueError(f"CalibrationConfig.tome_ratio must be in [0, 1], got {self.tome_ratio!r}")
        if self.tome_weights is not None and len(self.tome_weights) != len(self.bit_config.tiers):
            raise ValueError(f"CalibrationConfig.tome_weights needs one weight per tier "
                             f"({len(self.bit_config.tiers)}), got {len(self.tome_weights)}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CalibrationConfig:
        """A named preset ("fast" or "default"), optionally with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown calibration preset '{name}'; allowed: {', '.join(PRESETS)}")
        sizes = {  # the fast preset's end-to-end stage is one pass over its sequences (docs/benchmarks.md)
            "fast": {"n_samples": 8, "seqlen": 256, "end_to_end_steps": 8, "search_row_clips": False},
            "default": {"n_samples": 16, "seqlen": 512, "end_to_end_steps": 32},
        }[name]
        return cls(**{"preset": name, **sizes, **overrides})

    @property
    def steps_per_pass(self) -> int:
        """Optimizer steps in one pass over the calibration sequences."""
        return math.ceil(self.n_samples / self.batch_size)

    @property
    def steps_per_block(self) -> int:
        return self.epochs * self.steps_per_pass

    @property
    def scale_search_bits(self) -> tuple[int, ...]:
        return self.equalize_bits or self._lowest_tiers_bits

    @property
    def searched_clip_bits(self) -> tuple[int, ...]:
        """The widths whose clip logits start from the search; the others start from no shrink."""
        if self.search_row_clips:
            return self.bit_config.bits
        return tuple(b for b in self.bit_config.bits if self.bit_config.group_size_for(b) != -1)

    @property
    def clip_refine_bits(self) -> tuple[int, ...]:
        return self._lowest_tiers_bits if self.asymmetric_clip_bits is None else self.asymmetric_clip_bits

    @property
    def _lowest_tiers_bits(self) -> tuple[int, ...]:
        return tuple(b for tier in self.bit_config.tiers[:2] for b in tier)

    @property
    def merge_weights(self) -> tuple[float, ...]:
        return self.tome_weights or default_tome_weights(len(self.bit_config.tiers))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["bit_config"] = self.bit_config.to_dict()
        data["tome_weights"] = list(self.merge_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationConfig:
        values = dict(data)
        values["bit_config"] = BitConfig.from_dict(values["bit_config"])
        values["tome_weights"] = tuple(values["tome_weights"])
        for name in ("equalize_bits", "asymmetric_clip_bits"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


@dataclass
class BlockRecord:
    """Per-tier mean L1 loss of a block's first and last optimizer step (tiers low -> high)."""

    block: int
    first_loss: list[float]
    last_loss: list[float]
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CalibrationResult:
    elastic: dict[str, ElasticLinear]
    bit_config: BitConfig
    records: list[BlockRecord]
    fingerprint: str  # identifies (config, tokens, base model); checkpoints are bound to it
    seconds: float
    resumed_from: int = 0  # first block calibrated in this run (0: a fresh run)
    end_to_end: EndToEndRecord | None = None  # None: no end-to-end stage


def tier_label(tier: tuple[int, ...]) -> str:
    return "w" + "/".join(str(b) for b in tier)


class _StopAfterInputs(Exception):
    """Raised by the first block's pre-hook once its inputs are captured."""


def _first_block_call(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states and keyword arguments the model passes its first decoder block."""
    captured: dict = {}

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
        raise _StopAfterInputs

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model.model(input_ids=tokens, use_cache=False)
    except _StopAfterInputs:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


@torch.no_grad()
def block_inputs(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first block's fp32 input [n, N, C] for `tokens` [n, N] and the keyword arguments every
    block call needs (position_embeddings (cos, sin), attention_mask, position_ids), captured from a
    real forward pass. The arguments come from a one-sequence pass, so they broadcast to any batch."""
    hidden, _ = _first_block_call(model, tokens)
    _, block_kwargs = _first_block_call(model, tokens[:1])
    return hidden.float().clone(), block_kwargs


def _chunks(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


@torch.inference_mode()
def _forward_all(block: nn.Module, x: torch.Tensor, block_kwargs: dict, bits: int | None,
                 batch: int) -> torch.Tensor:
    set_bits(block, bits)
    return torch.cat([block(x[part], **block_kwargs) for part in _chunks(len(x), batch)])


@torch.inference_mode()
def _propagate(block: nn.Module, x_q: torch.Tensor, block_kwargs: dict, config: CalibrationConfig,
               rng: random.Random, batch: int) -> torch.Tensor:
    """MB-ToMe: per tier, one sampled bit per sequence; merge the tier outputs (§4)."""
    outputs = []
    for tier in config.bit_config.tiers:
        choices = [rng.choice(tier) for _ in range(len(x_q))]
        out = torch.empty_like(x_q)
        for bits in sorted(set(choices)):
            index = torch.tensor([i for i, c in enumerate(choices) if c == bits], device=x_q.device)
            out[index] = _forward_all(block, x_q[index], block_kwargs, bits, batch)
        outputs.append(out)
    return merge_tiers(outputs, config.merge_weights, config.tome_ratio)


def _train_block(block: nn.Module, linears: list[ElasticLinear], x_q: torch.Tensor, y_fp: torch.Tensor,
                 block_kwargs: dict, config: CalibrationConfig, rng: random.Random,
                 bar: tqdm) -> tuple[list[float], list[float]]:
    """Joint multi-bit reconstruction of one block; returns the per-tier losses of the first and last step."""
    tiers = config.bit_config.tiers
    lora = [p for m in linears for p in (m.lora_A, m.lora_B)]
    clips = [p for m in linears for b in config.bit_config.bits for p in (m.clip_up[str(b)], m.clip_low[str(b)])]
    optimizer = torch.optim.Adam([{"params": lora, "lr": config.lora_lr}, {"params": clips, "lr": config.clip_lr}])
    steps = config.steps_per_block
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(steps, config.min_lr_factor))
    batches = [part for _ in range(config.epochs) for part in _chunks(len(x_q), config.batch_size)]
    first: list[float] = []
    tier_losses: list[float] = []
    with trained(lora + clips):
        for step, part in enumerate(batches):
            x, target = x_q[part], y_fp[part]
            losses = {}
            for index in reversed(range(len(tiers))):  # high -> low, as the reference
                set_bits(block, rng.choice(tiers[index]))
                losses[index] = (block(x, **block_kwargs) - target).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            torch.stack(list(losses.values())).sum().backward()
            optimizer.step()
            schedule.step()
            tier_losses = [losses[i].item() for i in range(len(tiers))]
            if step == 0:
                first = tier_losses
            bar.set_postfix_str(" ".join(f"{tier_label(t)} {v:.4f}" for t, v in zip(tiers, tier_losses)))
            bar.update(1)
    return first, tier_losses


def calibration_fingerprint(config: CalibrationConfig, tokens: torch.Tensor, base_checksum: str) -> str:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(tokens.cpu().to(torch.int64).numpy().tobytes())
    digest.update(base_checksum.encode())
    return digest.hexdigest()


def calibrate(
    model: nn.Module,
    config: CalibrationConfig,
    tokens: torch.Tensor,
    *,
    base_checksum: str = "",
    checkpoint_dir: Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    inference_batch: int = 4,
) -> CalibrationResult:
    """Calibrate a LLaMA-family causal LM in place for every bit-width of `config.bit_config`.

    Every decoder-block linear becomes an ElasticLinear (left at full precision on return;
    `set_bits(model, b)` switches). `tokens` is a LongTensor [n_samples, seqlen]. With
    `checkpoint_dir`, finished blocks are saved there and a matching earlier run is resumed.
    """
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a LongTensor [n_samples, seqlen], got {tokens.dtype} {tuple(tokens.shape)}")
    if elastic_linears(model):
        raise ValueError("the model already has elastic linears; calibrate a freshly loaded base model")
    start_time = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    elastic = make_elastic(model, config.bit_config, seed=config.seed)
    model.to(device)
    tokens = tokens.to(device)
    layers = model.model.layers
    fingerprint = calibration_fingerprint(config, tokens, base_checksum)

    x_fp, block_kwargs = block_inputs(model, tokens)
    x_q = x_fp.clone()
    records: list[BlockRecord] = []
    start = 0
    checkpoint = CalibrationCheckpoint(checkpoint_dir, fingerprint) if checkpoint_dir is not None else None
    if checkpoint is not None:
        resumed = checkpoint.load(elastic, device)
        if resumed is not None:
            start, x_fp, x_q = resumed.next_block, resumed.x_fp, resumed.x_q
            records = [BlockRecord(**r) for r in resumed.records]
            fold_input_scales(layers[:start])  # the finished blocks' weights as their training saw them

    blocks_bar = tqdm(total=len(layers), initial=start, desc="calibrate", unit="block", disable=not progress)
    for k in range(start, len(layers)):
        block_start = time.perf_counter()
        block = layers[k]
        prefix = f"model.layers.{k}."
        by_path = {name.removeprefix(prefix): m for name, m in elastic.items() if name.startswith(prefix)}
        linears = list(by_path.values())
        rng = random.Random(f"{config.seed}:{k}")  # one stream per block: resuming needs no saved RNG state

        y_fp = _forward_all(block, x_fp, block_kwargs, None, inference_batch).clone()
        if config.clip_search or config.equalize:
            samples = x_q[: config.clip_search_samples]
            set_bits(block, None)
            grams = input_grams(block, linears, (samples[part] for part in _chunks(len(samples), inference_batch)),
                                block_kwargs)
            if config.equalize:
                grams_by_path = dict(zip(by_path, grams, strict=True))
                equalize_block(block, by_path, grams_by_path, config.scale_search_bits,
                               alphas(config.equalize_grid))
                grams = list(grams_by_path.values())
            if config.clip_search:
                init_clips(linears, grams, config.searched_clip_bits, clip_ratios(config.clip_search_grid),
                           config.clip_refine_bits)
                start_unclipped(linears, set(config.bit_config.bits) - set(config.searched_clip_bits))
        steps_bar = tqdm(total=config.steps_per_block, desc=f"block {k + 1}/{len(layers)}", unit="step",
                         leave=False, disable=not progress)
        first, last = _train_block(block, linears, x_q, y_fp, block_kwargs, config, rng, steps_bar)
        steps_bar.close()
        if k + 1 < len(layers):
            x_q = _propagate(block, x_q, block_kwargs, config, rng, inference_batch).clone()
        x_fp = y_fp
        set_bits(block, None)
        records.append(BlockRecord(k, first, last, time.perf_counter() - block_start))
        if checkpoint is not None:
            checkpoint.save_block(k, {n: m for n, m in elastic.items() if n.startswith(prefix)}, x_fp, x_q,
                                  [r.to_dict() for r in records])
        blocks_bar.update(1)
    blocks_bar.close()
    end_to_end = _tune_end_to_end(model, elastic, tokens, config, checkpoint, progress) \
        if config.end_to_end_steps else None
    set_bits(model, None)
    return CalibrationResult(elastic, config.bit_config, records, fingerprint,
                             time.perf_counter() - start_time, resumed_from=start, end_to_end=end_to_end)


def _tune_end_to_end(model: nn.Module, elastic: dict[str, ElasticLinear], tokens: torch.Tensor,
                     config: CalibrationConfig, checkpoint: CalibrationCheckpoint | None,
                     progress: bool) -> EndToEndRecord:
    """The end-to-end stage, resumed from the checkpoint's last saved step when there is one."""
    start_time = time.perf_counter()
    tuning = EndToEndTuning(model, elastic, config.bit_config, config.end_to_end_steps,
                            config.end_to_end_lora_lr, config.end_to_end_clip_lr, config.min_lr_factor, config.seed,
                            dtype=END_TO_END_DTYPES[config.end_to_end_dtype])

    def save(tuning: EndToEndTuning) -> None:
        if tuning.step % END_TO_END_CHECKPOINT_EVERY == 0 or tuning.step == tuning.steps:
            checkpoint.save_end_to_end(elastic, tuning.state_dict())

    if checkpoint is not None:
        saved = checkpoint.load_end_to_end(elastic)
        if saved is not None:
            tuning.load_state_dict(saved)
    tune_end_to_end(tuning, tokens, config.batch_size, progress, on_step=None if checkpoint is None else save)
    return tuning.record(config.steps_per_pass, time.perf_counter() - start_time)


def storage_bits(elastic: dict[str, ElasticLinear], bits: int) -> float:
    """Parameter-weighted storage bits per weight at `bits`, scales and zero-points included."""
    total = sum(m.weight.numel() for m in elastic.values())
    return sum(m.weight.numel() * storage_bits_per_weight(bits, m.bit_config.group_size_for(bits), m.in_features)
               for m in elastic.values()) / total


def summary_lines(result: CalibrationResult, config: CalibrationConfig) -> list[str]:
    """The end-of-run table: per-block tier losses (first -> last step), then bits per weight."""
    tiers = config.bit_config.tiers
    lines = ["block  " + "  ".join(f"{tier_label(t) + ' L1 first->last':>24}" for t in tiers) + "  seconds"]
    for record in result.records:
        cells = [f"{first:>11.5f} -> {last:<9.5f}" for first, last in zip(record.first_loss, record.last_loss)]
        lines.append(f"{record.block + 1:>5}  " + "  ".join(cells) + f"  {record.seconds:>7.1f}")
    resumed = f", resumed at block {result.resumed_from + 1}" if result.resumed_from else ""
    lines.append(f"calibrated {len(result.records)} blocks x {config.steps_per_block} steps on "
                 f"{config.n_samples} x {config.seqlen} tokens in {result.seconds:.1f} s{resumed}")
    tuned = result.end_to_end
    if tuned is not None and tuned.steps <= config.steps_per_pass:  # one pass: no later pass to compare
        kl = ", ".join(f"w{b} {first:.4f}" for b, first in zip(tuned.bits, tuned.first_kl))
        lines.append(f"end-to-end: {tuned.steps} steps in {tuned.seconds:.1f} s; KL to fp over its one pass: {kl}")
    elif tuned is not None:
        kl = ", ".join(f"w{b} {first:.4f} -> {last:.4f}" for b, first, last in zip(tuned.bits, tuned.first_kl, tuned.last_kl))
        lines.append(f"end-to-end: {tuned.steps} steps in {tuned.seconds:.1f} s; KL to fp, first pass -> last: {kl}")
    lines.append("bits  group  bits/weight (with fp16 scale + 8-bit zero per group)")
    for bits in config.bit_config.bits:
        group = config.bit_config.group_size_for(bits)
        lines.append(f"{bits:>4}  {'row' if group == -1 else group:>5}  {storage_bits(result.elastic, bits):.3f}")
    return lines
