"""Builds the native uffd loader as part of every install (wheel, sdist build and editable)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BINARY = Path("snapstore", "_native", "uffd_loader")


def compile_loader(output: Path) -> None:
    # Loaded by path: importing the snapstore package would need its runtime dependencies,
    # which the isolated build environment does not have.
    spec = importlib.util.spec_from_file_location("uffd_build", ROOT / "snapstore/uffd/build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.compile_loader(ROOT / "native" / "uffd_loader.c", output)


class BuildPyWithLoader(build_py):
    def run(self) -> None:
        super().run()
        # Editable installs import the package from the source tree, so the binary goes there.
        target = ROOT if self.editable_mode else Path(self.build_lib)
        compile_loader(target / BINARY)


setup(cmdclass={"build_py": BuildPyWithLoader})
