"""A deterministic tiny Llama model folder, in Hugging Face's format, locally (no hub):
`config.json`, `model.safetensors` and a byte-level tokenizer (`tokenizer.json`,
`tokenizer_config.json`), the same bytes for the same seed on every machine.

The tokenizer has no merges: every UTF-8 byte of the text is one token (ids 3-258, after
<unk>, <s> and </s>), so any text round-trips and nothing depends on training.

Built by `tools/make_tiny_model.py`, by the tests and by the demo when there is no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from engine_adapters.reference.config import CONFIG_FILE, WEIGHTS_FILE, ModelConfig

TOKENIZER_FILE = "tokenizer.json"

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# vLLM's CPU attention takes head sizes from 32 and blocks of a multiple of 32 tokens: the same
# model, wider, for the vLLM connector's tests and example (`make_tiny_model.py --vllm-cpu`).
VLLM_CPU = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}


def make_tiny_model(out: Path, seed: int = 0, overrides: dict[str, object] | None = None) -> Path:
    """Write the folder (replacing its two files) and return it."""
    settings = {**TINY, **(overrides or {})}
    config = ModelConfig.from_json(settings, "the tiny model's settings")
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in sorted(config.weight_shapes().items()):
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape) + 0.1 * torch.randn(shape, generator=generator)
        else:
            weights[name] = torch.randn(shape, generator=generator) * (1.0 / shape[-1] ** 0.5)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    write_tokenizer(out, config.max_position_embeddings)
    return out


SPECIALS = ("<unk>", "<s>", "</s>")


def write_tokenizer(out: Path, max_length: int) -> None:
    """A byte-level tokenizer without merges, with <s> before every text."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: number for number, token in enumerate(SPECIALS)}
    vocab |= {symbol: len(SPECIALS) + number for number, symbol in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(out / TOKENIZER_FILE))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": max_length,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
