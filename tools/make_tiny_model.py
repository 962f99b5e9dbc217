"""Build a deterministic tiny Llama model folder, in Hugging Face's format, locally (no hub):
weights, config and a byte-level tokenizer (engine_adapters/reference/tiny.py).

    .venv/bin/python tools/make_tiny_model.py --out models/tiny-llama [--seed 0] [--vllm-cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_adapters.reference.tiny import TOKENIZER_FILE, VLLM_CPU, make_tiny_model

__all__ = ["TOKENIZER_FILE", "make_tiny_model"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-cpu", action="store_true", help="head size 32, as vLLM's CPU attention needs")
    args = parser.parse_args()
    print(make_tiny_model(args.out, args.seed, VLLM_CPU if args.vllm_cpu else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
