"""GPU dumps: a CUDA process's memory as segment files and a region table, and loading it back."""
