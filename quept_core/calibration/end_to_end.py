"""End-to-end tuning after the block loop: each width's next-token distribution against the float model's.

The block loop fits every block to its float output on its own input; the errors that 30 quantized
blocks add up to are seen by none of them. This stage trains, on the whole model, the shared LoRA
factors and the clip logits of the tiers that carry a LoRA rank (the lowest ones by default), with
one joint loss: per step, one sampled bit per tuned tier, the KL divergence of its next-token
distribution from the float model's, summed over the tiers (EfficientQAT's end-to-end phase, with
QuEPT's one set of parameters for every width). Tiers without a rank keep their block-trained clips,
so the LoRA prefix is only ever trained against the losses of every tier that reads it. The quantized
passes run their matmuls in bfloat16 by default (`CalibrationConfig.end_to_end_dtype`), as the engine
serves them; the float model's distribution is computed in float32.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quept_core.calibration.training import cosine_factor, trained
from quept_core.config import BitConfig
from quept_core.quant.elastic import ElasticLinear, set_bits

# The dtypes the stage's quantized passes may run their matmuls in (CalibrationConfig.end_to_end_dtype).
END_TO_END_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class EndToEndRecord:
    """Mean KL per tuned bit over the first and over the last pass through the calibration sequences."""

    bits: list[int]
    first_kl: list[float]
    last_kl: list[float]
    steps: int
    seconds: float

    def losses(self) -> dict:
        """What the manifest keeps (not the seconds: the same seed and data give the same manifest)."""
        return {"bits": self.bits, "first_kl": self.first_kl, "last_kl": self.last_kl, "steps": self.steps}


def tuned_tiers(bit_config: BitConfig) -> tuple[tuple[int, ...], ...]:
    """The tiers this stage tunes: those with a LoRA rank, which share the factors it trains."""
    return tuple(tier for tier, rank in zip(bit_config.tiers, bit_config.tier_ranks) if rank > 0)


def tuned_parameters(elastic: dict[str, ElasticLinear], bit_config: BitConfig) -> tuple[list, list]:
    """(LoRA factors, clip logits of the tuned tiers' bits), in a fixed order (the optimizer state's)."""
    bits = [b for tier in tuned_tiers(bit_config) for b in tier]
    lora = [p for m in elastic.values() for p in (m.lora_A, m.lora_B)]
    clips = [p for m in elastic.values() for b in bits for p in (m.clip_up[str(b)], m.clip_low[str(b)])]
    return lora, clips


def next_token_kl(log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged over every position of the batch."""
    return F.kl_div(log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1).mean()


def _log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), dim=-1)


@contextmanager
def _layer_checkpointing(model: nn.Module) -> Iterator[None]:
    """Recompute each decoder layer in the backward pass instead of keeping its saved tensors: every
    linear's fake quantizer keeps its weight and codes for the backward, about 1.3 GB a width on the
    default model, where one layer at a time is enough (transformers' activation checkpointing, which
    runs in training mode only: dropout, a module or an attention's rate, stays off meanwhile)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    attention_rates = {m: m.attention_dropout for m in model.modules()
                       if isinstance(getattr(m, "attention_dropout", None), float)}
    for module in dropouts:
        module.eval()
    for module in attention_rates:
        module.attention_dropout = 0.0
    try:
        yield
    finally:
        for module, rate in attention_rates.items():
            module.attention_dropout = rate
        model.eval()
        model.activation_checkpointing_disable()


class EndToEndTuning:
    """The stage's optimizer, schedule and step counter, so that a checkpoint can stop and resume it."""

    def __init__(self, model: nn.Module, elastic: dict[str, ElasticLinear], bit_config: BitConfig,
                 steps: int, lora_lr: float, clip_lr: float, min_lr_factor: float, seed: int,
                 dtype: torch.dtype = torch.float32):
        self.model, self.bit_config, self.steps, self.seed = model, bit_config, steps, seed
        self.dtype = dtype  # of the quantized passes' matmuls (autocast); the teacher's stay float32
        self.tiers = tuned_tiers(bit_config)
        self.lora, self.clips = tuned_parameters(elastic, bit_config)
        self.optimizer = torch.optim.Adam([{"params": self.lora, "lr": lora_lr},
                                           {"params": self.clips, "lr": clip_lr}])
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_factor(steps, min_lr_factor))
        self.step = 0
        self.kl_by_step: list[dict[int, float]] = []  # the KL of each bit sampled at each step

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "kl_by_step": self.kl_by_step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.kl_by_step = state["kl_by_step"]

    def run_step(self, tokens: torch.Tensor, batch_size: int) -> dict[int, float]:
        """One optimizer step on the step's batch of calibration sequences; returns each sampled bit's KL."""
        n = len(tokens)
        batch = tokens[[(self.step * batch_size + i) % n for i in range(min(batch_size, n))]]
        rng = random.Random(f"{self.seed}:end-to-end:{self.step}")  # one stream per step: resumable
        # The float model's distribution is computed again at every step (one forward pass without
        # gradients): kept for every sequence, it would hold 805 MB on the default preset (16 x 512
        # positions x 49,152 tokens in bf16).
        with torch.no_grad():
            set_bits(self.model, None)
            teacher = _log_probs(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        kl = {}
        try:
            with trained(self.lora + self.clips), _layer_checkpointing(self.model), \
                    torch.autocast(batch.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                for tier in self.tiers:  # one backward per tier: one graph of the model at a time
                    bits = rng.choice(tier)
                    set_bits(self.model, bits)  # stays set through the backward, which recomputes layers
                    loss = next_token_kl(_log_probs(self.model, batch), teacher)
                    loss.backward()
                    kl[bits] = loss.item()
                self.optimizer.step()
            self.schedule.step()
        finally:
            set_bits(self.model, None)
        self.step += 1
        self.kl_by_step.append(kl)
        return kl

    def record(self, steps_per_pass: int, seconds: float) -> EndToEndRecord:
        """Mean KL per bit over the first and the last `steps_per_pass` steps (the same sequences)."""
        pass_length = min(steps_per_pass, len(self.kl_by_step))
        bits = sorted({b for step in self.kl_by_step for b in step})

        def means(steps: list[dict[int, float]]) -> list[float]:
            return [sum(s[b] for s in steps if b in s) / max(1, sum(b in s for s in steps)) for b in bits]

        return EndToEndRecord(bits, means(self.kl_by_step[:pass_length]), means(self.kl_by_step[-pass_length:]),
                              len(self.kl_by_step), seconds)


def tune_end_to_end(tuning: EndToEndTuning, tokens: torch.Tensor, batch_size: int, progress: bool,
                    on_step=None) -> None:
    """Run `tuning` from its current step to its last; `on_step(tuning)` after each (a checkpoint)."""
    bar = tqdm(total=tuning.steps, initial=tuning.step, desc="end-to-end", unit="step", disable=not progress)
    while tuning.step < tuning.steps:
        kl = tuning.run_step(tokens, batch_size)
        bar.set_postfix_str(" ".join(f"w{b} KL {v:.4f}" for b, v in kl.items()))
        bar.update(1)
        if on_step is not None:
            on_step(tuning)
    bar.close()
