"""The storage tiers: DRAM (shared memory), HBM (a torch device slab) and NVMe (slab files + LMDB)."""
