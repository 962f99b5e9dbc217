"""kvstore: KV-cache-centric tiered storage for disaggregated LLM serving."""
