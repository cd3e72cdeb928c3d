"""The one place that names a LLaMA block's quantized linears, their fused groups and layer ids.

A linear is named by its transformers module path, `model.layers.<i>.<path>`; the runtime fuses
linears that read the same input into one weight (q|k|v, gate|up) when a plan gives them one width.
"""

from __future__ import annotations

from collections.abc import Sized

# Short kind -> module path inside a decoder block, in model order.
LINEAR_PATHS: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LINEAR_KINDS: tuple[str, ...] = tuple(LINEAR_PATHS)
BLOCK_LINEARS: tuple[str, ...] = tuple(LINEAR_PATHS.values())

# Linears that read the same input tensor, in model order: one recording (and one Hessian) serves a
# group, and the runtime runs a group whose members share a bit-width as one fused weight.
INPUT_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"),
                                            "down": ("down",)}
FUSED: dict[str, tuple[str, ...]] = {name: kinds for name, kinds in INPUT_GROUPS.items() if len(kinds) > 1}
FUSED_PATHS: dict[str, str] = {"qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}
# The same groups as module paths, for code that hooks a transformers block.
INPUT_GROUP_PATHS: tuple[tuple[str, ...], ...] = tuple(tuple(LINEAR_PATHS[k] for k in kinds)
                                                       for kinds in INPUT_GROUPS.values())

# The output head (tied to the embedding in small LLaMAs); its bit-width is a field of every plan.
HEAD = "lm_head"


def layer_name(block: int, path: str) -> str:
    return f"model.layers.{block}.{path}"


def linear_names(n_blocks: int) -> list[str]:
    """Full names of the quantized linears, block by block in `BLOCK_LINEARS` order."""
    return [layer_name(i, path) for i in range(n_blocks) for path in BLOCK_LINEARS]


def model_linear_names(model) -> list[str]:
    """`linear_names` for a transformers LLaMA (`model.model.layers`)."""
    layers: Sized = model.model.layers
    return linear_names(len(layers))


def block_of(name: str) -> int:
    """The block index of a full linear name."""
    return int(name.split(".")[2])


def linear_type(name: str) -> str:
    """`q_proj`, ..., `down_proj`: the last part of a full linear name."""
    return name.rsplit(".", 1)[-1]


def fused_members(fused_name: str) -> list[str]:
    """The full linear names behind a fused weight name (`model.layers.3.self_attn.qkv_proj` -> q, k, v)."""
    for group, path in FUSED_PATHS.items():
        if fused_name.endswith(path):
            prefix = fused_name[: -len(path)]
            return [prefix + LINEAR_PATHS[kind] for kind in FUSED[group]]
    return [fused_name]
