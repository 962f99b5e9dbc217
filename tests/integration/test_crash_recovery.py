"""A store process killed with SIGKILL in the middle of writing leaves nothing torn behind:
after a restart, every block the NVMe index knows is served with exactly its bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kvstore.store import Store
from kvstore.types import TierKind
from tests import factories as f

WRITER = """
import sys
from pathlib import Path
import numpy as np
from kvstore.config import WritePolicy
from tests import factories as f
from tests.integration.test_crash_recovery import NVME_BLOCKS, payload_of

ns = f.namespace()
cfg = f.config(Path(sys.argv[1]), dram_blocks=64, nvme_blocks=NVME_BLOCKS, write_policy=WritePolicy.WRITE_THROUGH)
with f.store(cfg) as store:
    nid = store.register_namespace(ns)
    for round_ in range(NVME_BLOCKS // 8):  # never more than fits: nothing is evicted from NVMe
        keys = f.chain(nid, 8, seed=round_)
        store.put_blocks(nid, keys, [payload_of(key, ns.block_bytes) for key in keys])
        if round_ == 3:
            print("writing", flush=True)
"""


NVME_BLOCKS = 8192


def payload_of(key: bytes, size: int) -> np.ndarray:
    """The bytes every test process derives for a key, so the survivor can check them."""
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, size, dtype=np.uint8)


def test_a_killed_writer_leaves_only_whole_blocks(tmp_path: Path):
    root = Path(__file__).resolve().parents[2]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        time.sleep(0.3)  # let it get well into a later batch
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    ns = f.namespace()
    with Store(f.config(tmp_path, nvme_blocks=NVME_BLOCKS)) as store:
        nid = store.register_namespace(ns)
        nvme = store.stats().tier(TierKind.NVME)
        assert nvme.used_bytes == nvme.num_blocks * ns.block_bytes  # no slot held by a torn write
        complete = served = 0
        for round_ in range(NVME_BLOCKS // 8):
            keys = f.chain(nid, 8, seed=round_)
            blocks = store.get_blocks(nid, keys)
            for block, key in zip(blocks, keys, strict=False):
                assert np.array_equal(block, payload_of(key, ns.block_bytes))
            served += len(blocks)
            if len(blocks) < 8:
                break
            complete += 1
        assert complete >= 4  # the rounds the writer announced before it was killed
        assert served == nvme.num_blocks  # every recorded block is one of the rounds, in order
        assert store.stats().tier(TierKind.NVME).checksum_failures == 0
