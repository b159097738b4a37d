"""The exceptions snapstore raises on purpose; the CLI turns each into one line."""


class SnapstoreError(Exception):
    """A failure the user can act on; its message is shown as is."""

    exit_status = 1


class UsageError(SnapstoreError):
    """The command line or a reference was wrong (exit status 2)."""

    exit_status = 2


class NotFoundError(SnapstoreError):
    """A tag, snapshot or chunk does not exist."""


class NoMatchError(NotFoundError):
    """No snapshot matches what a restore asked for (exit status 3, so a node agent can
    tell it from a restore that failed)."""

    exit_status = 3


class CorruptError(SnapstoreError):
    """Stored data failed a hash, format or consistency check."""


class ManifestError(CorruptError):
    """A manifest is malformed, hostile or of an unknown version."""


class RestoreError(SnapstoreError):
    """A snapshot was found but the process could not be brought back (exit status 4)."""

    exit_status = 4


class NotCheckpointableError(SnapstoreError):
    """A process tree is configured in a way its checkpoint could not restore; nothing was
    done to it (exit status 5)."""

    exit_status = 5
