"""The exceptions snapstore raises on purpose; the CLI turns each into one line."""


class SnapstoreError(Exception):
    """A failure the user can act on; its message is shown as is."""


class UsageError(SnapstoreError):
    """The command line or a reference was wrong (exit status 2)."""


class NotFoundError(SnapstoreError):
    """A tag, snapshot or chunk does not exist."""


class CorruptError(SnapstoreError):
    """Stored data failed a hash, format or consistency check."""


class ManifestError(CorruptError):
    """A manifest is malformed, hostile or of an unknown version."""
