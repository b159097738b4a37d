"""Defaults of the remote commands, in a module light enough for the CLI to import early."""

# Parallel requests of one transfer. Against moto (benchmarks/RESULTS.md) 4 to 32 made
# no clear difference: its one Python process is the limit. Real S3 scales per request, so
# more pay off there (--jobs); 16 keeps memory at a few dozen MiB of chunks in flight.
DEFAULT_JOBS = 16
# Never delete a remote object younger than this: a push may still be writing under it.
DEFAULT_GRACE_S = 24 * 3600
# Disk a remote mount may fill with fetched chunks (STORE/cache).
DEFAULT_CACHE_BYTES = 4 << 30
# Parallel GETs of one mount. The FUSE layer's read-ahead asks for several chunks at once.
DEFAULT_CONNECTIONS = 16
# Push closes a pack of chunks at this size (benchmarks/RESULTS.md: 8, 16 and 32 MiB
# measured against moto). Each parallel upload holds one pack in memory.
DEFAULT_PACK_BYTES = 16 << 20
# --pack-size may go up to this (a pack may exceed its target by one chunk).
MAX_PACK_TARGET = 256 << 20
