"""The gVisor runtime: checkpoint and restore of runsc containers through the store."""
