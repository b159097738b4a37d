"""Object storage: push and pull snapshots to an S3 bucket, read them lazily, collect garbage.

Layout and invariants of the bucket are in docs/remote.md.
"""
