"""snapstore: a deduplicating storage engine for container checkpoint images."""

__version__ = "0.1.0"
