"""A Llama-architecture decoder in plain torch, with a paged KV cache and paged attention.

RMSNorm, rotary position embedding (Hugging Face's rotate-half convention), grouped-query
attention and a SwiGLU MLP, with weights named as Hugging Face names them. Every forward call
takes tokens at absolute positions `start .. start + n - 1` of one sequence: their K and V are
written into the sequence's blocks of the `PagedCache`, and each query attends to every
position up to its own, read back from the blocks (paged attention). Prefill is one call with
the uncached tokens (starting after the cached prefix); decode is one call per token.

`dense_logits` computes the same model without any cache, all positions at once: the
definition the paged path is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine_adapters.kernels.paged import CacheLayout, PagedKV
from engine_adapters.reference.config import ModelConfig, read_config, weight_files
from kvstore.errors import InvalidArgumentError


class PagedCache:
    """KV for every sequence of an engine: one stacked tensor
    `(layers, 2, num_blocks, block_size, kv_heads, head_dim)` and a free list of blocks."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise InvalidArgumentError(f"a paged cache needs blocks; got {num_blocks} of {block_size} tokens")
        self.block_size = block_size
        self.tensor = torch.zeros(
            (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim),
            dtype=dtype,
        )
        self._free = list(range(num_blocks - 1, -1, -1))
        self._paged = PagedKV.from_tensors(CacheLayout.STACKED, [self.tensor])  # checked once

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise InvalidArgumentError(f"the KV cache has {len(self._free)} free blocks, {count} asked")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(blocks))

    def paged(self) -> PagedKV:
        """The cache as the block-copy kernels see it."""
        return self._paged


class LlamaModel:
    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> None:
        expected = config.weight_shapes()
        missing = sorted(expected.keys() - weights.keys())
        if missing:
            raise InvalidArgumentError(f"the weights lack {len(missing)} tensors, first {missing[0]!r}")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise InvalidArgumentError(f"weight {name!r} is {tuple(weights[name].shape)}, the config wants {shape}")
        self.config = config
        self.dtype = dtype
        self.w = {name: weights[name].to(dtype) for name in expected}
        if config.tie_word_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        half = config.head_dim // 2
        self._inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float64) / half))

    @classmethod
    def load(cls, folder: Path | str, dtype: torch.dtype = torch.float32) -> LlamaModel:
        folder = Path(folder)
        config = read_config(folder)
        weights: dict[str, torch.Tensor] = {}
        for path in weight_files(folder):
            try:
                shard = load_file(str(path))
            except Exception as error:  # safetensors raises its own types for a malformed file
                raise InvalidArgumentError(f"{path} is not a readable safetensors file: {error}") from None
            repeated = shard.keys() & weights.keys()
            if repeated:
                raise InvalidArgumentError(f"{path}: tensor {min(repeated)!r} is also in another shard")
            weights |= shard
        return cls(config, weights, dtype)

    # -- the paged path ------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, block_table: Sequence[int], cache: PagedCache) -> torch.Tensor:
        """Logits `(n, vocab)` of `tokens` at positions `start..start+n-1`, whose KV this writes
        into `block_table`'s blocks; the positions before `start` must already be there."""
        count = tokens.numel()
        end = start + count
        check_tokens(tokens, self.config.vocab_size)
        if start < 0:
            raise InvalidArgumentError(f"start must not be negative, got {start}")
        if end > len(block_table) * cache.block_size:
            raise InvalidArgumentError(
                f"{end} positions need {math.ceil(end / cache.block_size)} blocks; the table has {len(block_table)}"
            )
        if end > self.config.max_position_embeddings:
            raise InvalidArgumentError(f"position {end - 1} is past max_position_embeddings")
        positions = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.int64)
        all_positions = torch.arange(end)
        read_blocks, read_offsets = table[all_positions // cache.block_size], all_positions % cache.block_size
        write_blocks, write_offsets = read_blocks[start:], read_offsets[start:]
        x = self.w["model.embed_tokens.weight"][tokens]
        cos, sin = self._rope(positions)
        mask = all_positions[None, :] <= positions[:, None]  # query i sees keys up to its position
        for layer in range(self.config.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = _rms_norm(x, self.w[p + "input_layernorm.weight"], self.config.rms_norm_eps)
            q, k, v = self._qkv(h, p, cos, sin)
            cache.tensor[layer, 0, write_blocks, write_offsets] = k.to(cache.tensor.dtype)
            cache.tensor[layer, 1, write_blocks, write_offsets] = v.to(cache.tensor.dtype)
            keys = cache.tensor[layer, 0, read_blocks, read_offsets].to(self.dtype)
            values = cache.tensor[layer, 1, read_blocks, read_offsets].to(self.dtype)
            x = x + self._attend(q, keys, values, mask, p)
            x = x + self._mlp(_rms_norm(x, self.w[p + "post_attention_layernorm.weight"], self.config.rms_norm_eps), p)
        return self._logits(x)

    # -- the definition --------------------------------------------------------------------------

    @torch.inference_mode()
    def dense_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The same model over the whole sequence at once, with no cache."""
        check_tokens(tokens, self.config.vocab_size)
        positions = torch.arange(tokens.numel())
        x = self.w["model.embed_tokens.weight"][tokens]
        cos, sin = self._rope(positions)
        mask = positions[None, :] <= positions[:, None]
        for layer in range(self.config.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = _rms_norm(x, self.w[p + "input_layernorm.weight"], self.config.rms_norm_eps)
            q, k, v = self._qkv(h, p, cos, sin)
            x = x + self._attend(q, k, v, mask, p)
            x = x + self._mlp(_rms_norm(x, self.w[p + "post_attention_layernorm.weight"], self.config.rms_norm_eps), p)
        return self._logits(x)

    # -- pieces ----------------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float64)[:, None] * self._inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(self.dtype)[:, None, :], angles.sin().to(self.dtype)[:, None, :]

    def _qkv(
        self, h: torch.Tensor, p: str, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config, count = self.config, h.shape[0]
        q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(count, config.num_attention_heads, config.head_dim)
        k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(count, config.num_key_value_heads, config.head_dim)
        v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(count, config.num_key_value_heads, config.head_dim)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, p: str
    ) -> torch.Tensor:
        config = self.config
        group = config.num_attention_heads // config.num_key_value_heads
        keys = keys.repeat_interleave(group, dim=1)  # (T, heads, d)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,thd->hnt", q.float(), keys.float()) / math.sqrt(config.head_dim)
        scores = scores.masked_fill(~mask[None, :, :], float("-inf"))
        out = torch.einsum("hnt,thd->nhd", scores.softmax(dim=-1), values.float()).to(self.dtype)
        return out.reshape(q.shape[0], -1) @ self.w[p + "self_attn.o_proj.weight"].T

    def _mlp(self, h: torch.Tensor, p: str) -> torch.Tensor:
        gate = h @ self.w[p + "mlp.gate_proj.weight"].T
        up = h @ self.w[p + "mlp.up_proj.weight"].T
        return (torch.nn.functional.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = _rms_norm(x, self.w["model.norm.weight"], self.config.rms_norm_eps)
        return (x @ self.w["lm_head.weight"].T).float()


def check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    """A non-empty 1-D tensor of token ids within the vocabulary, or InvalidArgumentError."""
    if tokens.dim() != 1 or not tokens.numel():
        raise InvalidArgumentError(f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise InvalidArgumentError(f"token ids must be integers, got {tokens.dtype}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise InvalidArgumentError(f"token ids must be within [0, {vocab_size}), got {low}..{high}")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
