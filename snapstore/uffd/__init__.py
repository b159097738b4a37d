"""userfaultfd page loading: the native loader's Python front end and a test client."""

from snapstore.uffd.page_loader import LoaderNotBuiltError, LoaderOptions, binary_path, build_argv

__all__ = ["LoaderNotBuiltError", "LoaderOptions", "binary_path", "build_argv"]
