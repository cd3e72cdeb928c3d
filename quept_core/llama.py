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

from quept_core.kernels import DenseWeight, PackedWeight


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
    __slots__ = ("attn_norm", "down", "gate", "k", "mlp_norm", "o", "q", "up", "v")

    def __init__(self, layer, index: int, device: torch.device, dtype: torch.dtype):
        self.attn_norm = layer.input_layernorm.weight.detach().to(device, dtype)
        self.mlp_norm = layer.post_attention_layernorm.weight.detach().to(device, dtype)
        prefix = f"model.layers.{index}."
        for attr, path in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                           ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                           ("down", "mlp.down_proj")):
            setattr(self, attr, Slot(prefix + path))

    def slots(self) -> list[Slot]:
        return [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Like transformers' LlamaRMSNorm: normalise in float32, scale in the compute dtype.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CompactLlama:
    """The LLaMA forward pass; weights are Slots (linears, head) and plain tensors (norms, rope)."""

    def __init__(self, hf_model: PreTrainedModel, device: torch.device, dtype: torch.dtype):
        self.dims = LlamaDims.from_config(hf_model.config)
        self.device, self.dtype = device, dtype
        inner = hf_model.model
        self.blocks = [Block(layer, i, device, dtype) for i, layer in enumerate(inner.layers)]
        self.final_norm = inner.norm.weight.detach().to(device, dtype)
        self.tied = hf_model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        self.head = Slot("lm_head")
        # An untied model keeps its own embedding table; a tied one looks rows up in the head's pack.
        self.embedding = None if self.tied else DenseWeight(inner.embed_tokens.weight.to(device), dtype)
        self.cos, self.sin = self._rope_tables(hf_model)

    def _rope_tables(self, hf_model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from transformers' own rotary module (honours rope_scaling)."""
        positions = torch.arange(self.dims.max_positions).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = hf_model.model.rotary_emb(probe, positions)
        return cos[0].to(self.device, self.dtype), sin[0].to(self.device, self.dtype)

    def linear_slots(self) -> list[Slot]:
        return [slot for block in self.blocks for slot in block.slots()]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.head.pack if self.tied else self.embedding
        return table.rows(tokens)

    def _attention_inputs(self, block: Block, x: torch.Tensor, positions: torch.Tensor):
        batch, seq, _ = x.shape
        d = self.dims
        h = rms_norm(x, block.attn_norm, d.eps)
        q = block.q(h).view(batch, seq, d.n_heads, d.head_dim).transpose(1, 2)
        k = block.k(h).view(batch, seq, d.n_kv_heads, d.head_dim).transpose(1, 2)
        v = block.v(h).view(batch, seq, d.n_kv_heads, d.head_dim).transpose(1, 2)
        cos = self.cos[positions].unsqueeze(1)  # [batch, 1, seq, head_dim]
        sin = self.sin[positions].unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def _finish_block(self, block: Block, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        batch, seq = x.shape[:2]
        x = x + block.o(attn.transpose(1, 2).reshape(batch, seq, -1))
        h = rms_norm(x, block.mlp_norm, self.dims.eps)
        return x + block.down(F.silu(block.gate(h)) * block.up(h))

    def prefill(self, tokens: torch.Tensor, cache: KVCache | None, last: torch.Tensor | None) -> torch.Tensor:
        """Run prompts [batch, seq] (right-padded) from position 0, filling `cache` when given.

        Returns the logits at positions `last` [batch] (float32 [batch, vocab]), or at every position
        when `last` is None (float32 [batch, seq, vocab]).
        """
        batch, seq = tokens.shape
        positions = torch.arange(seq, device=self.device).expand(batch, seq)
        x = self.embed(tokens)
        for index, block in enumerate(self.blocks):
            q, k, v = self._attention_inputs(block, x, positions)
            if cache is not None:
                cache.k[index, :batch, :, :seq] = k
                cache.v[index, :batch, :, :seq] = v
            # Right padding: a real query never sees a padded key under the causal mask.
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = self._finish_block(block, x, attn)
        if last is not None:
            x = x[torch.arange(batch, device=self.device), last]
        return self.head(rms_norm(x, self.final_norm, self.dims.eps)).float()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        """One token per sequence: tokens/positions [batch]; attends to cache positions < span.

        `mask` [batch, 1, 1, span] (True = attend) is needed when sequences sit at different positions.
        Returns float32 logits [batch, vocab].
        """
        batch = tokens.shape[0]
        rows = torch.arange(batch, device=self.device)
        x = self.embed(tokens).unsqueeze(1)
        pos = positions.unsqueeze(1)
        for index, block in enumerate(self.blocks):
            q, k, v = self._attention_inputs(block, x, pos)
            keys, values = cache.k[index], cache.v[index]
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            attn = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=mask,
                                                  enable_gqa=True)
            x = self._finish_block(block, x, attn)
        return self.head(rms_norm(x[:, 0], self.final_norm, self.dims.eps)).float()
