"""Defaults of the remote commands, in a module light enough for the CLI to import early."""

import math

from snapstore.errors import UsageError

# Parallel requests of one transfer. Against moto (benchmarks/RESULTS.md) 4 to 32 made
# no clear difference: its one Python process is the limit. Real S3 scales per request, so
# more pay off there (--jobs); 16 keeps memory at a few dozen MiB of chunks in flight.
DEFAULT_JOBS = 16
# Never delete a remote object younger than this: a push may still be writing under it.
DEFAULT_GRACE_S = 24 * 3600
# gc refuses a shorter grace unless forced. The grace has to outlast a push, from its
# listing of what the remote holds to its tag: pushes measured here send a GiB in seconds
# (benchmarks/RESULTS.md), so an hour covers snapshots of a hundred GiB or more over a
# link of a few tens of MB/s, and a push that outlives the grace all the same finds what
# gc took when it checks its tag's snapshot, and sends it again.
MIN_GRACE_S = 3600
# A longer grace is no use (and overflows the dates it is subtracted from).
MAX_GRACE_S = 100 * 365 * 24 * 3600
# Disk a remote mount may fill with fetched chunks (STORE/cache).
DEFAULT_CACHE_BYTES = 4 << 30
# Parallel GETs of one mount. The FUSE layer's read-ahead asks for several chunks at once.
DEFAULT_CONNECTIONS = 16
# Push closes a pack of chunks at this size (benchmarks/RESULTS.md: 8, 16 and 32 MiB
# measured against moto). Each parallel upload holds one pack in memory.
DEFAULT_PACK_BYTES = 16 << 20
# --pack-size may go up to this (a pack may exceed its target by one chunk).
MAX_PACK_TARGET = 256 << 20


def check_grace(grace_s: float, force: bool) -> float:
    """`grace_s` if remote gc may use it; UsageError for what is no duration, and for a
    grace below MIN_GRACE_S unless `force`."""
    if not math.isfinite(grace_s) or not 0 <= grace_s <= MAX_GRACE_S:
        raise UsageError(f"--grace must be a number of seconds from 0 to {MAX_GRACE_S}, "
                         f"got {grace_s}")
    if grace_s < MIN_GRACE_S and not force:
        raise UsageError(f"--grace {grace_s:g} is shorter than {MIN_GRACE_S} s: gc could "
                         "delete what a push running now writes; add --force if none runs")
    return grace_s
