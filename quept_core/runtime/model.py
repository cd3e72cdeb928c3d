"""A compact LLaMA forward pass over swappable packed weights, with a preallocated KV cache.

The weights are read once from a transformers `LlamaForCausalLM`; every quantized linear (and the
tied embedding / output head) is a `Slot` whose `pack` is swapped to change precision.
Prefill (many rows: dense matmuls, causal SDPA) and decode (one row per sequence: packed kernels)
are separate functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from quept_core.layers import FUSED, FUSED_PATHS, HEAD, LINEAR_KINDS, LINEAR_PATHS, layer_name
from quept_core.runtime.kernels.formats import DenseWeight, PackedWeight


@dataclass(frozen=True)
class LlamaDims:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int

    @classmethod
    def from_config(cls, config) -> LlamaDims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.vocab_size, config.rms_norm_eps,
                   config.max_position_embeddings)


class Slot:
    """A reference to the current pack of one weight; switching precision replaces the reference."""

    __slots__ = ("name", "pack")

    def __init__(self, name: str, pack: PackedWeight | None = None):
        self.name = name
        self.pack = pack

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.pack(x)


class KVCache:
    """Keys and values for a batch: [layers, batch, kv_heads, max_len, head_dim] each."""

    def __init__(self, dims: LlamaDims, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (dims.n_layers, batch, dims.n_kv_heads, max_len, dims.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def keep_rows(self, rows: list[int]) -> None:
        """Drop the other sequences' slots (one copy, when a sequence ends)."""
        index = torch.tensor(rows, device=self.k.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class Block:
    """One decoder layer: norms, and a slot per linear plus a slot per fused group (q|k|v, gate|up).

    A plan whose q, k and v share a bit-width binds the fused slot (one kernel call) and leaves the
    single slots empty; otherwise the reverse. Likewise for gate and up.
    """

    __slots__ = ("attn_norm", "down", "gate", "gate_up", "k", "mlp_norm", "o", "q", "qkv", "up", "v")

    def __init__(self, layer, index: int, device: torch.device, dtype: torch.dtype):
        self.attn_norm = layer.input_layernorm.weight.detach().to(device, dtype)
        self.mlp_norm = layer.post_attention_layernorm.weight.detach().to(device, dtype)
        for attr in LINEAR_KINDS:
            setattr(self, attr, Slot(layer_name(index, LINEAR_PATHS[attr])))
        for attr in FUSED:
            setattr(self, attr, Slot(layer_name(index, FUSED_PATHS[attr])))

    def slots(self) -> list[Slot]:
        return [getattr(self, attr) for attr in LINEAR_KINDS]

    def qkv_out(self, h: torch.Tensor) -> torch.Tensor:
        if self.qkv.pack is not None:
            return self.qkv(h)
        return torch.cat([self.q(h), self.k(h), self.v(h)], dim=-1)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate_up.pack is not None:
            gate, up = self.gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = self.gate(h), self.up(h)
        return self.down(F.silu(gate) * up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused op (it accumulates in float32 for bf16 inputs).
    return F.rms_norm(x, weight.shape, weight, eps)


class CompactLlama:
    """The LLaMA forward pass; weights are Slots (linears, head) and plain tensors (norms, rope)."""

    def __init__(self, hf_model: PreTrainedModel, device: torch.device, dtype: torch.dtype):
        self.dims = LlamaDims.from_config(hf_model.config)
        self.device, self.dtype = device, dtype
        inner = hf_model.model
        self.blocks = [Block(layer, i, device, dtype) for i, layer in enumerate(inner.layers)]
        self.final_norm = inner.norm.weight.detach().to(device, dtype)
        self.tied = hf_model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        self.head = Slot(HEAD)
        # An untied model keeps its own embedding table; a tied one looks rows up in the head's pack.
        self.embedding = None if self.tied else DenseWeight(inner.embed_tokens.weight.to(device), dtype)
        self.cos, self.sin = self._rope_tables(hf_model)

    def _rope_tables(self, hf_model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for every position, from transformers' own rotary module (honours rope_scaling).

        rotate_half(x) * sin == x.roll(d/2) * [-sin_1, sin_2], so the rotation is a roll and two products.
        """
        positions = torch.arange(self.dims.max_positions).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = hf_model.model.rotary_emb(probe, positions)
        half = self.dims.head_dim // 2
        sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return cos[0].to(self.device, self.dtype), sin.to(self.device, self.dtype)

    def linear_slots(self) -> list[Slot]:
        return [slot for block in self.blocks for slot in block.slots()]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.head.pack if self.tied else self.embedding
        return table.rows(tokens)

    def _qkv(self, block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections with RoPE on q and k: q [b, s, heads, d], k and v [b, s, kv_heads, d]."""
        batch, seq, _ = x.shape
        d = self.dims
        qkv = block.qkv_out(rms_norm(x, block.attn_norm, d.eps)).view(batch, seq, d.n_heads + 2 * d.n_kv_heads, d.head_dim)
        rotated = d.n_heads + d.n_kv_heads
        qk = qkv[:, :, :rotated]
        qk = torch.addcmul(qk * cos, qk.roll(d.head_dim // 2, dims=-1), sin)
        return qk[:, :, : d.n_heads], qk[:, :, d.n_heads:], qkv[:, :, rotated:]

    def _finish_block(self, block: Block, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + block.o(attn)
        return x + block.mlp(rms_norm(x, block.mlp_norm, self.dims.eps))

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # [b, s, 1, d]

    def prefill(self, tokens: torch.Tensor, cache: KVCache | None, last: torch.Tensor | None) -> torch.Tensor:
        """Run prompts [batch, seq] (right-padded) from position 0, filling `cache` when given.

        Returns the logits at positions `last` [batch] (float32 [batch, vocab]), or at every position
        when `last` is None (float32 [batch, seq, vocab]).
        """
        batch, seq = tokens.shape
        cos, sin = self._rope_at(torch.arange(seq, device=self.device).expand(batch, seq))
        x = self.embed(tokens)
        for index, block in enumerate(self.blocks):
            q, k, v = (t.transpose(1, 2) for t in self._qkv(block, x, cos, sin))
            if cache is not None:
                cache.k[index, :batch, :, :seq] = k
                cache.v[index, :batch, :, :seq] = v
            # Right padding: a real query never sees a padded key under the causal mask.
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = self._finish_block(block, x, attn.transpose(1, 2).reshape(batch, seq, -1))
        if last is not None:
            x = x[torch.arange(batch, device=self.device), last]
            return self.head.pack.linear(rms_norm(x, self.final_norm, self.dims.eps), torch.float32)
        return self.head(rms_norm(x, self.final_norm, self.dims.eps)).float()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int,
               mask: torch.Tensor | None, position: int | None) -> torch.Tensor:
        """One token per sequence: tokens/positions [batch]; attends to cache positions < span.

        `position` is the shared position when every sequence is at the same one; otherwise `mask`
        [batch, 1, 1, span] (0 or -inf) hides each sequence's future slots. Returns float32 logits [batch, vocab].
        """
        d = self.dims
        batch = tokens.shape[0]
        group = d.n_heads // d.n_kv_heads
        rows = torch.arange(batch, device=self.device)
        cos, sin = self._rope_at(positions.unsqueeze(1))
        x = self.embed(tokens).unsqueeze(1)
        scale = d.head_dim**-0.5
        for index, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, x, cos, sin)
            keys, values = cache.k[index], cache.v[index]
            if position is not None:
                keys[:, :, position] = k[:, 0]
                values[:, :, position] = v[:, 0]
            else:
                keys[rows, :, positions] = k[:, 0].to(keys.dtype)
                values[rows, :, positions] = v[:, 0].to(values.dtype)
            # Grouped-query attention for one query: [b, kv_heads, group, d] against [b, kv_heads, span, d].
            scores = torch.matmul(q.reshape(batch, d.n_kv_heads, group, d.head_dim).to(keys.dtype),
                                  keys[:, :, :span].transpose(-1, -2)).float() * scale
            if mask is not None:
                scores = scores + mask
            attn = torch.matmul(scores.softmax(-1).to(values.dtype), values[:, :, :span]).to(self.dtype)
            x = self._finish_block(block, x, attn.reshape(batch, 1, -1))
        return self.head.pack.linear(rms_norm(x[:, 0], self.final_norm, self.dims.eps), torch.float32)
