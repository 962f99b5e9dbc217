"""A model folder in Hugging Face's format: `config.json` (a LlamaForCausalLM) and
`model.safetensors`, or shards listed in `model.safetensors.index.json`. Everything is checked
when the folder is opened: a missing folder or file, a field missing or out of range, a
feature this model does not implement (RoPE scaling, biases, another activation), a weight
missing or of the wrong shape is an `InvalidArgumentError` naming it, before any weight is
used: a config that would load but compute something else is refused, never approximated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.errors import InvalidArgumentError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights: {"weight_map": {tensor: file}}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> ModelConfig:
        def field(name: str, kind: type, default: Any = None) -> Any:
            value = data.get(name, default)
            if value is None:
                raise InvalidArgumentError(f"{where}: missing field {name!r}")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise InvalidArgumentError(f"{where}: {name!r} must be of type {kind.__name__}, got {value!r}")
            return value

        architectures = data.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in architectures:
            raise InvalidArgumentError(f"{where}: architectures {architectures} is not a LlamaForCausalLM")
        _refuse_unimplemented(data, where)
        heads = field("num_attention_heads", int)
        hidden = field("hidden_size", int)
        config = cls(
            vocab_size=field("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=field("intermediate_size", int),
            num_hidden_layers=field("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=field("num_key_value_heads", int, heads),
            head_dim=field("head_dim", int, hidden // heads if heads else 0),
            rms_norm_eps=field("rms_norm_eps", float, 1e-6),
            rope_theta=field("rope_theta", float, 10000.0),
            max_position_embeddings=field("max_position_embeddings", int, 2048),
            tie_word_embeddings=field("tie_word_embeddings", bool, False),
        )
        config.check(where)
        return config

    def check(self, where: str) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidArgumentError(
                f"{where}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise InvalidArgumentError(f"{where}: head_dim must be even (rotary embedding), got {self.head_dim}")

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the folder must hold, by its Hugging Face name."""
        hidden, inner, head = self.hidden_size, self.intermediate_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, hidden),
            "model.norm.weight": (hidden,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, hidden)
        for layer in range(self.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            shapes |= {
                prefix + "input_layernorm.weight": (hidden,),
                prefix + "post_attention_layernorm.weight": (hidden,),
                prefix + "self_attn.q_proj.weight": (self.num_attention_heads * head, hidden),
                prefix + "self_attn.k_proj.weight": (self.num_key_value_heads * head, hidden),
                prefix + "self_attn.v_proj.weight": (self.num_key_value_heads * head, hidden),
                prefix + "self_attn.o_proj.weight": (hidden, self.num_attention_heads * head),
                prefix + "mlp.gate_proj.weight": (inner, hidden),
                prefix + "mlp.up_proj.weight": (inner, hidden),
                prefix + "mlp.down_proj.weight": (hidden, inner),
            }
        return shapes


def _refuse_unimplemented(data: dict[str, Any], where: str) -> None:
    """Fields of a Llama config that change what it computes, in the values this model does
    not implement."""
    scaling = data.get("rope_scaling")
    if scaling is not None and not (
        isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"
    ):
        raise InvalidArgumentError(f"{where}: rope_scaling {scaling!r} is not implemented (only plain RoPE)")
    for name in ("attention_bias", "mlp_bias"):
        if data.get(name, False) is not False:
            raise InvalidArgumentError(f"{where}: {name} {data[name]!r} is not implemented (no biases)")
    activation = data.get("hidden_act", "silu")
    if activation != "silu":
        raise InvalidArgumentError(f"{where}: hidden_act {activation!r} is not implemented (only 'silu')")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: `model.safetensors`, or the shards its
    index names (each once, each inside the folder)."""
    index = folder / WEIGHTS_INDEX_FILE
    if not index.is_file():
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise InvalidArgumentError(f"model folder {folder} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE})")
        return [path]
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as error:
        raise InvalidArgumentError(f"{index} is not JSON: {error}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidArgumentError(f"{index}: needs a non-empty 'weight_map' of tensor name to file")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name:
            raise InvalidArgumentError(f"{index}: shard {name!r} must be a file name in the folder")
        path = folder / name
        if not path.is_file():
            raise InvalidArgumentError(f"{index}: shard {name} is missing")
        files.append(path)
    return files


def read_config(folder: Path) -> ModelConfig:
    if not folder.is_dir():
        raise InvalidArgumentError(f"model folder {folder} does not exist (build one: tools/make_tiny_model.py)")
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"model folder {folder} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as error:
        raise InvalidArgumentError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path} must hold a JSON object")
    return ModelConfig.from_json(data, str(path))
