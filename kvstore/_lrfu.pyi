# prefix-lrfu's per-row work, compiled (kvstore/_lrfu.c); see kvstore/policy/prefix_lrfu.py.
# Arrays are passed as buffers: rows int64; incarnations and the slot table uint32; the histogram
# float64; weights, times and the history's weights and times float32; written in place.

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
def evict(
    rows: object,
    tier: int,
    tiers: int,
    mine: object,
    current: object,
    slot: object,
    keys: list[bytes | None],
    weight: object,
    last: object,
    history_tag: object,
    history_weight: object,
    history_last: object,
    /,
) -> int: ...
def adopt(
    rows: object,
    mine: object,
    current: object,
    keys: list[bytes | None],
    weight: object,
    last: object,
    history_tag: object,
    history_weight: object,
    history_last: object,
    /,
) -> int: ...
