"""Where an S3 store is, s3://BUCKET[/PREFIX] parsed and checked, and how long one read
from it may take; light, for the command line to import early."""

from __future__ import annotations

import re
from dataclasses import dataclass

from snapstore.errors import UsageError

# S3's rules for bucket names (virtual-host safe): 3-63 lowercase letters, digits, '.', '-'.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART_RE = re.compile(r"[A-Za-z0-9!_.*'()+=@,:-]+")

# One read from a remote (a GET, its retries included) fails after this many seconds:
# a mount's reader waits at most this long for an endpoint that stopped answering. A pull
# reads up to 16 MiB per GET, --jobs (16) at a time, so it needs about 9 MB/s in all (a
# 100 Mbit/s link); slower links need a longer --read-timeout or fewer --jobs.
DEFAULT_READ_TIMEOUT_S = 30.0
MAX_READ_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class RemoteURL:
    """A bucket and an optional key prefix under which the store layout lives."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> RemoteURL:
        scheme, sep, rest = text.partition("://")
        if not sep or scheme != "s3":
            raise UsageError(f"a remote is s3://BUCKET[/PREFIX], got {text!r:.100}")
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise UsageError(f"invalid bucket name {bucket!r:.80} in {text!r:.100}")
        parts = [p for p in prefix.split("/") if p]
        for p in parts:
            # The prefix is joined into keys: no '.'/'..' parts, nothing a shell or URL mangles.
            if p in (".", "..") or not _PREFIX_PART_RE.fullmatch(p):
                raise UsageError(f"invalid prefix component {p!r:.80} in {text!r:.100}")
        return cls(bucket, "/".join(parts))

    def key(self, rel: str) -> str:
        """The object key of `rel` (a path of the store layout, e.g. 'chunks/ab/cd..')."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        """Inverse of `key` for keys listed under this remote."""
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
