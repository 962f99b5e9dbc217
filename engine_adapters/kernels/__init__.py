"""Block copies between an engine's paged KV cache and contiguous block payloads (issue 6).

`paged.PagedKV` describes an engine's cache from its tensors; `reference` defines what a
gather and a scatter mean, in plain torch, for every supported layout. CUDA kernels (built
only where CUDA exists) must match it bit for bit.
"""
