"""Build hooks: generate the gRPC modules from kvstore/proto/kvstore.proto before packaging, and
compile the shared index's read path (kvstore/_index_probe.c) and prefix-lrfu's per-row work
(kvstore/_lrfu.c); both optional: without a C compiler the package does the same in
numpy and Python, more slowly.

Everything else about the package is declared in pyproject.toml.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPyWithProto(build_py):
    def run(self) -> None:
        path = Path(__file__).parent / "kvstore" / "proto" / "build.py"
        spec = importlib.util.spec_from_file_location("kvstore_proto_build", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate()
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithProto},
    ext_modules=[
        Extension("kvstore._index_probe", ["kvstore/_index_probe.c"], extra_compile_args=["-O2"], optional=True),
        Extension("kvstore._lrfu", ["kvstore/_lrfu.c"], extra_compile_args=["-O2"], optional=True),
    ],
)
