"""A read-only FUSE filesystem that presents a snapshot and loads its chunks on demand.

`fusefs.mount.serve` is the entry point for callers that bring their own chunk source;
`snapstore mount` (snapstore.cli.mount) wraps it with a daemon, a log and a stats file.
"""
