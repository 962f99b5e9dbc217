# prefix-lrfu's per-row access work, compiled (kvstore/_lrfu_access.c); see kvstore/policy/prefix_lrfu.py.
# `rows` is int64; `mine`/`current` uint32; `weight`/`histogram` float64 and `last` float32, written in place.

def access(
    rows: object,
    mine: object,
    current: object,
    weight: object,
    last: object,
    histogram: object,
    time: float,
    term: float,
    step: float,
    /,
) -> int: ...
