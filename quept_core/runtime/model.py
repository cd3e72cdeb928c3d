"""A compact LLaMA forward pass over packed weights laid out for a set of sequences.

Every matmul call site (a block's q|k|v, o, gate|up and down, and the output head) is run by a
`SiteLayout`: the packs that serve it and the rows (sequences) each one serves. One plan gives one
pack per site for all rows; a running set that mixes plans groups its rows by the bit-width each plan
gives the site, one kernel call per width present. Layouts are built when the set of plans changes,
never inside a step.

Prefill runs one sequence (or perplexity windows) with dense matmuls and causal SDPA; decode runs one
token of every running sequence, reading and writing the engine's KV pool by slot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quept_core.layers import FUSED, FUSED_PATHS, HEAD, LINEAR_PATHS, layer_name, linear_type
from quept_core.runtime.kernels.formats import PackedWeight
from quept_core.runtime.kvpool import KVPool
from quept_core.runtime.weights import EMBEDDING, ServingWeights

# What the runtime reads from a transformers config (LlamaDims, RoPE, end-of-sequence ids; head_dim
# is optional).
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
               "eos_token_id")


@dataclass(frozen=True)
class LlamaDims:
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int

    @classmethod
    def from_config(cls, config) -> LlamaDims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.vocab_size, config.rms_norm_eps,
                   config.max_position_embeddings)


def linear_shape(dims: LlamaDims, name: str) -> tuple[int, int]:
    """(out_features, in_features) of a block linear, from the model's dimensions."""
    attention, kv = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    return {"q_proj": (attention, dims.hidden), "k_proj": (kv, dims.hidden), "v_proj": (kv, dims.hidden),
            "o_proj": (dims.hidden, attention), "gate_proj": (dims.ffn, dims.hidden),
            "up_proj": (dims.ffn, dims.hidden), "down_proj": (dims.hidden, dims.ffn)}[linear_type(name)]


@dataclass(frozen=True)
class Site:
    """One matmul call site: a fused or single weight name and the linears behind it."""

    name: str
    members: tuple[str, ...]


def block_sites(index: int) -> dict[str, Site]:
    """The call sites of block `index`, by role: qkv, o, gate_up, down."""
    def single(kind: str) -> Site:
        name = layer_name(index, LINEAR_PATHS[kind])
        return Site(name, (name,))

    sites = {role: Site(layer_name(index, FUSED_PATHS[role]),
                        tuple(layer_name(index, LINEAR_PATHS[k]) for k in FUSED[role])) for role in FUSED}
    return {"qkv": sites["qkv"], "o": single("o"), "gate_up": sites["gate_up"], "down": single("down")}


HEAD_SITE = Site(HEAD, (HEAD,))


@dataclass(frozen=True)
class SitePart:
    """Packs serving some rows of a site, their outputs side by side (one pack unless a plan splits a
    fused site by bit-width)."""

    packs: tuple[PackedWeight, ...]
    rows: tuple[int, ...] | None  # None: every row, in order
    row_index: torch.Tensor | None  # the rows as an index tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.packs) == 1:
            return self.packs[0](x)
        return torch.cat([pack(x) for pack in self.packs], dim=-1)


def site_part(packs: Sequence[PackedWeight], rows: Sequence[int], total: int, device: torch.device,
              indices: dict[tuple[int, ...], torch.Tensor] | None = None) -> SitePart:
    """A part over `rows` of `total` rows (every row in order: no index). `indices`: index tensors made
    so far, by rows, to share."""
    rows = tuple(rows)
    if rows == tuple(range(total)):
        return SitePart(tuple(packs), None, None)
    index = None if indices is None else indices.get(rows)
    if index is None:
        index = torch.tensor(rows, dtype=torch.long, device=device)
        if indices is not None:
            indices[rows] = index
    return SitePart(tuple(packs), rows, index)


@dataclass(frozen=True)
class SiteLayout:
    """The parts serving one site."""

    parts: tuple[SitePart, ...]
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, tokens, in] -> [rows, tokens, out]."""
        if len(self.parts) == 1 and self.parts[0].rows is None:
            return self.parts[0](x)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for part in self.parts:
            out.index_copy_(0, part.row_index, part(x.index_select(0, part.row_index)))
        return out


@dataclass(frozen=True)
class Layout:
    """Site layouts for every block and the head, plus the embedding lookup, for one row order.

    `embed`: the head's parts, whose packs' dequantized rows are the tied embedding (empty when the
    model has its own embedding)."""

    blocks: tuple[dict[str, SiteLayout], ...]
    head: SiteLayout
    embed: tuple[SitePart, ...]

    def packs(self) -> Iterator[PackedWeight]:
        """The packs of every part of every block's sites and of the head (one serving several parts, once per part)."""
        for site in [*(site for block in self.blocks for site in block.values()), self.head]:
            for part in site.parts:
                yield from part.packs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused op (it accumulates in float32 for bf16 inputs).
    return F.rms_norm(x, weight.shape, weight, eps)


class CompactLlama:
    """Norms, RoPE tables and the forward passes; the weights come in as a Layout."""

    def __init__(self, weights: ServingWeights, device: torch.device, dtype: torch.dtype):
        config = weights.config
        self.dims = LlamaDims.from_config(config)
        self.device, self.dtype = device, dtype
        self.tied = weights.tied
        n = self.dims.n_layers
        self.attn_norms = [weights.norm(f"model.layers.{i}.input_layernorm").to(device, dtype) for i in range(n)]
        self.mlp_norms = [weights.norm(f"model.layers.{i}.post_attention_layernorm").to(device, dtype)
                          for i in range(n)]
        self.final_norm = weights.norm("model.norm").to(device, dtype)
        self.sites = [block_sites(i) for i in range(n)]
        self.embedding = None if self.tied else weights.dense(EMBEDDING).to(device, dtype)
        # RoPE's inverse frequencies (float32 [head_dim / 2]) and attention scaling: each pass computes the
        # angles of the positions it runs (a float32 table of every position held 4 MiB for 8,192 positions).
        inv_freq, self.rope_scaling = _rope_frequencies(config, self.dims.head_dim)
        self.inv_freq = inv_freq.to(device)

    @property
    def norm_bytes(self) -> int:
        norms = [*self.attn_norms, *self.mlp_norms, self.final_norm]
        embedding = 0 if self.embedding is None else self.embedding.numel() * self.embedding.element_size()
        return sum(t.numel() * t.element_size() for t in norms) + embedding

    # ---- pieces shared by prefill and decode ----------------------------------------------------

    def embed(self, layout: Layout, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [rows, seq] -> [rows, seq, hidden]."""
        if self.embedding is not None:
            return F.embedding(tokens, self.embedding)
        if len(layout.embed) == 1 and layout.embed[0].rows is None:
            return layout.embed[0].packs[0].rows(tokens)
        out = torch.empty(*tokens.shape, self.dims.hidden, device=self.device, dtype=self.dtype)
        for part in layout.embed:
            out.index_copy_(0, part.row_index, part.packs[0].rows(tokens.index_select(0, part.row_index)))
        return out

    def _qkv(self, sites: dict[str, SiteLayout], index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections with RoPE on q and k: q [b, s, heads, d], k and v [b, s, kv_heads, d]."""
        batch, seq, _ = x.shape
        d = self.dims
        h = rms_norm(x, self.attn_norms[index], d.eps)
        qkv = sites["qkv"](h).view(batch, seq, d.n_heads + 2 * d.n_kv_heads, d.head_dim)
        rotated = d.n_heads + d.n_kv_heads
        qk = qkv[:, :, :rotated]
        qk = torch.addcmul(qk * cos, qk.roll(d.head_dim // 2, dims=-1), sin)
        return qk[:, :, : d.n_heads], qk[:, :, d.n_heads:], qkv[:, :, rotated:]

    def _finish_block(self, sites: dict[str, SiteLayout], index: int, x: torch.Tensor,
                      attn: torch.Tensor) -> torch.Tensor:
        x = x + sites["o"](attn)
        h = rms_norm(x, self.mlp_norms[index], self.dims.eps)
        gate, up = sites["gate_up"](h).chunk(2, dim=-1)
        return x + sites["down"](F.silu(gate) * up)

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin at `positions` [b, s], as transformers computes them (float32 angles,
        rope_scaling honoured): rotate_half(x) * sin == x.roll(d/2) * [-sin_1, sin_2], so the rotation is a
        roll and two products. Returns [b, s, 1, d] in the compute dtype."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        cos, sin = angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        return cos.to(self.dtype).unsqueeze(2), sin.to(self.dtype).unsqueeze(2)

    def _head(self, layout: Layout, x: torch.Tensor) -> torch.Tensor:
        return layout.head(rms_norm(x, self.final_norm, self.dims.eps)).float()

    # ---- prefill --------------------------------------------------------------------------------

    def prefill(self, layout: Layout, tokens: torch.Tensor, pool: KVPool | None = None,
                slots: Sequence[int] | None = None, lengths: Sequence[int] | None = None) -> torch.Tensor:
        """Run prompts [rows, seq] from position 0, each row under its own plan's parts of `layout`.

        With a pool, row i's keys and values are written to KV slot `slots[i]`, its prompt is its first
        `lengths[i]` tokens (the rest is padding, after it: the causal mask keeps it out of the prompt's
        positions, and the slot's length hides it from later steps), and the float32 logits at each
        prompt's last position come back [rows, vocab]. Without a pool, logits at every position
        [rows, seq, vocab] (perplexity).
        """
        rows, seq = tokens.shape
        cos, sin = self._rope_at(torch.arange(seq, device=self.device).expand(rows, seq))
        x = self.embed(layout, tokens)
        if pool is not None:
            slot_index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        for index, sites in enumerate(layout.blocks):
            q, k, v = (t.transpose(1, 2) for t in self._qkv(sites, index, x, cos, sin))
            if pool is not None:
                pool.k[index][slot_index, :, :seq] = k.to(pool.k.dtype)
                pool.v[index][slot_index, :, :seq] = v.to(pool.v.dtype)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = self._finish_block(sites, index, x, attn.transpose(1, 2).reshape(rows, seq, -1))
        if pool is None:
            return self._head(layout, x)
        last = torch.tensor([length - 1 for length in (lengths or [seq] * rows)], device=self.device)
        return self._head(layout, x[torch.arange(rows, device=self.device), last].unsqueeze(1))[:, -1]

    # ---- decode ---------------------------------------------------------------------------------

    def decode(self, layout: Layout, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               pool: KVPool, span: int) -> torch.Tensor:
        """One token per running sequence: tokens, positions and KV slots [rows]; reads cache positions
        < span. Returns float32 logits [rows, vocab]."""
        d = self.dims
        rows = tokens.shape[0]
        group = d.n_heads // d.n_kv_heads
        cos, sin = self._rope_at(positions.unsqueeze(1))
        x = self.embed(layout, tokens.unsqueeze(1))
        scale = d.head_dim**-0.5
        # Positions past a sequence's own are hidden from it (other sequences may be longer). The pool is
        # uninitialised there, so hidden scores are replaced, not added to, and hidden values zeroed.
        hidden = (torch.arange(span, device=self.device).unsqueeze(0) > positions.unsqueeze(1))[:, None, :, None]
        for index, sites in enumerate(layout.blocks):
            q, k, v = self._qkv(sites, index, x, cos, sin)
            keys, values = pool.k[index], pool.v[index]
            keys[slots, :, positions] = k[:, 0].to(keys.dtype)
            values[slots, :, positions] = v[:, 0].to(values.dtype)
            # Grouped-query attention for one query: [b, kv_heads, group, d] against [b, kv_heads, span, d].
            scores = torch.matmul(q.reshape(rows, d.n_kv_heads, group, d.head_dim).to(keys.dtype),
                                  keys[slots, :, :span].transpose(-1, -2)).float() * scale
            scores = scores.masked_fill(hidden.transpose(-1, -2), float("-inf"))
            visible = values[slots, :, :span].masked_fill(hidden, 0.0)
            attn = torch.matmul(scores.softmax(-1).to(values.dtype), visible).to(self.dtype)
            x = self._finish_block(sites, index, x, attn.reshape(rows, 1, -1))
        return self._head(layout, x)[:, 0]


def _rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and its attention scaling, as transformers' LlamaRotaryEmbedding has them.
    The default rope needs nothing from transformers; scaled ropes use its init functions (imported only
    then: the module takes a second to import)."""
    parameters = config.rope_parameters
    if parameters["rope_type"] == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (parameters["rope_theta"] ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](config)
    return inv_freq.float(), float(scaling)
