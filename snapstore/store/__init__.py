"""Stores of chunks, manifests and tags."""
