"""The CRIU runtime: checkpoint a process tree (and its CUDA state) into the store and
restore it from a lazy mount of the snapshot."""
