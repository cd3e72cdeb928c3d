"""Running a LLaMA model one decoder block at a time, and recording what its linears read.

Block-wise algorithms (GPTQ, sensitivity probes) keep every block's input hidden states and feed
them through `run_block` with the same rotary embeddings and causal mask the full model would use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quept_core.layers import INPUT_GROUP_PATHS


@dataclass
class BlockContext:
    """What every block call needs besides the hidden states (shared by all sequences of one length)."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
    """Block 0's input hidden states [n, T, C] for `tokens` [n, T], and the block context."""
    from transformers.masking_utils import create_causal_mask  # imports torch._dynamo: seconds, only here

    tokens = tokens.to(model_device(model))
    hidden = model.model.embed_tokens(tokens)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    # One sequence is enough to build the mask: it broadcasts over the batch.
    mask = create_causal_mask(
        config=model.config, inputs_embeds=hidden[:1], attention_mask=None, cache=None, position_ids=position_ids
    )
    cos_sin = model.model.rotary_emb(hidden[:1], position_ids=position_ids)
    return hidden, BlockContext(cos_sin, mask, position_ids)


@torch.no_grad()
def run_block(layer: nn.Module, hidden: torch.Tensor, context: BlockContext, batch_size: int = 8) -> torch.Tensor:
    """The block's output for `hidden` [n, T, C], computed `batch_size` sequences at a time."""
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        out = layer(
            hidden[start : start + batch_size],
            attention_mask=context.attention_mask,
            position_ids=context.position_ids,
            position_embeddings=context.position_embeddings,
        )
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outputs)


@torch.no_grad()
def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and output head applied to the last block's output."""
    return model.lm_head(model.model.norm(hidden))


@contextmanager
def captured_inputs(layer: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the inputs of each input group's first linear while the context is open.

    Yields a dict from the group's first linear (e.g. `self_attn.q_proj`) to the list of its
    input batches, each [tokens, in_features]; the lists fill as the block runs.
    """
    inputs: dict[str, list[torch.Tensor]] = {group[0]: [] for group in INPUT_GROUP_PATHS}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        return record

    for group in INPUT_GROUP_PATHS:
        handles.append(layer.get_submodule(group[0]).register_forward_hook(hook(group[0])))
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def input_gram(batches: list[torch.Tensor]) -> torch.Tensor:
    """X^T X in float32 over the recorded input batches."""
    gram = None
    for x in batches:
        x = x.float()
        gram = x.T @ x if gram is None else gram + x.T @ x
    return gram


def input_basis(batches: list[torch.Tensor]) -> torch.Tensor:
    """A matrix B with B^T B = X^T X and at most in_features rows, for ||X Dᵀ||² = ||B Dᵀ||².

    X itself when it has fewer rows than columns, else the R factor of its QR decomposition.
    """
    x = torch.cat(batches).float()
    if x.shape[0] <= x.shape[1]:
        return x
    return torch.linalg.qr(x, mode="r").R
