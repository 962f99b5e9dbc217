"""Generate the Python modules and type stubs of `kvstore.proto` (a build step, never by hand).

Run by the Makefile before anything imports the API, and by `setup.py`'s build hook when a
wheel is built. Output lands beside the proto file and is ignored by git. Regenerates only when
the proto file is newer than the outputs, so it is cheap to call on every build.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PROTO = Path(__file__).with_name("kvstore.proto")
OUTPUTS = ("kvstore_pb2.py", "kvstore_pb2_grpc.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.pyi")


def is_current(directory: Path = PROTO.parent) -> bool:
    source_time = PROTO.stat().st_mtime
    return all((directory / name).exists() and (directory / name).stat().st_mtime >= source_time for name in OUTPUTS)


def generate(*, force: bool = False) -> bool:
    """Write the generated modules next to the proto file; returns whether anything was written."""
    if not force and is_current():
        return False
    from grpc_tools import protoc  # noqa: PLC0415 (a build-time dependency: imported only here)

    root = PROTO.parents[2]  # so the generated code imports `kvstore.proto.kvstore_pb2`
    plugin_dir = Path(sys.executable).parent
    arguments = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={root}",
        f"--grpc_python_out={root}",
    ]
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(plugin_dir)) or shutil.which("protoc-gen-mypy")
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(plugin_dir)) or shutil.which(
        "protoc-gen-mypy_grpc"
    )
    if mypy_plugin and mypy_grpc_plugin:
        arguments += [
            f"--plugin=protoc-gen-mypy={mypy_plugin}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
            f"--mypy_out={root}",
            f"--mypy_grpc_out={root}",
        ]
    else:  # stubs are for the type checker only; the runtime modules suffice to run
        arguments.append(f"--pyi_out={root}")
    arguments.append(str(PROTO.relative_to(root)))
    if protoc.main(arguments) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    return True


if __name__ == "__main__":
    wrote = generate(force="--force" in sys.argv)
    print(f"{PROTO.name}: {'generated' if wrote else 'up to date'}")
