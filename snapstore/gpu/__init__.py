"""GPU dumps: a CUDA process's memory as a page file and region table, and loading it back."""
