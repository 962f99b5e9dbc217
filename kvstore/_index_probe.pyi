# The compiled probe of the shared index (kvstore/_index_probe.c); see kvstore/shared_index.py.
# `buckets` and `header` are read-only buffers (the index's mapping).

def probe(
    keys: bytes, tag: int, buckets: object, header: object, /
) -> tuple[int, bytes, bytes, bytes, bytes] | None: ...
def copy_blocks(source: object, offsets: object, size: int, dests: object, /) -> None: ...
