"""Example workloads and the demo: inputs for snapstore, outside the engine package."""
