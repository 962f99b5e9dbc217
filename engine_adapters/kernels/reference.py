"""What a gather and a scatter mean, in plain torch: the definition the CUDA kernels are held
to, bit for bit, and the path used where there is no CUDA.

`gather(kv, block_ids, out)`: block `block_ids[i]` of every layer, into payload `i` of `out`
(the store's packing for the layout: see paged.py). `scatter(kv, block_ids, payloads)`: the
reverse. Both check everything first (paged.py) and change nothing when a check fails.
"""

from __future__ import annotations

import torch

from engine_adapters.kernels.paged import CacheLayout, PagedKV


def gather(kv: PagedKV, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    kv.check_blocks(block_ids, distinct=False)
    typed = kv.check_payloads(out, block_ids.numel())
    if not block_ids.numel():
        return
    ids = block_ids.to(kv.device, torch.int64)
    if kv.layout is CacheLayout.STACKED:
        # (layers, 2, n, size, heads, head) -> (n, layers, 2, size, heads, head)
        typed.copy_(kv.tensors[0].index_select(2, ids).permute(2, 0, 1, 3, 4, 5))
        return
    for layer, tensor in enumerate(kv.tensors):
        if kv.layout is CacheLayout.FLASH:  # (2, n, size, heads, head) -> (n, 2, size, heads, head)
            typed[:, layer].copy_(tensor.index_select(1, ids).transpose(0, 1))
        else:  # cpu: (n, heads, size, 2 * head), as stored
            typed[:, layer].copy_(tensor.index_select(0, ids))


def scatter(kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor) -> None:
    kv.check_blocks(block_ids, distinct=True)
    typed = kv.check_payloads(payloads, block_ids.numel())
    if not block_ids.numel():
        return
    ids = block_ids.to(kv.device, torch.int64)
    source = typed.to(kv.device)
    if kv.layout is CacheLayout.STACKED:
        kv.tensors[0].index_copy_(2, ids, source.permute(1, 2, 0, 3, 4, 5))
        return
    for layer, tensor in enumerate(kv.tensors):
        if kv.layout is CacheLayout.FLASH:
            tensor.index_copy_(1, ids, source[:, layer].transpose(0, 1))
        else:
            tensor.index_copy_(0, ids, source[:, layer])
