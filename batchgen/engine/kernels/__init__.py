"""batchgen's own Mojo ops: source in this package, built once per machine and cached.

MAX re-precompiles a source directory on every graph build (seconds each time); a prebuilt
`.mojoc` loads at once. So the package is built with the `mojo` compiler that the `max` wheel
installs, into a cache keyed by the hash of the source and the MAX and Mojo versions, and
never shipped as a binary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

SOURCES = Path(__file__).parent
SLOT_ATTENTION = SOURCES / "slot_attention"
SLOT_HEAD_DIMS = (8, 16, 32, 64, 128)  # the head sizes slot_attention is built for


class KernelBuildError(RuntimeError):
    """Our Mojo ops cannot be built on this machine; the message says why and what to do."""


def cache_dir() -> Path:
    """Where built kernels live: $BATCHGEN_CACHE_DIR, else $XDG_CACHE_HOME/batchgen."""
    if os.environ.get("BATCHGEN_CACHE_DIR"):
        return Path(os.environ["BATCHGEN_CACHE_DIR"]) / "kernels"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "batchgen" / "kernels"


def built_package(source: Path = SLOT_ATTENTION) -> Path:
    """The `.mojoc` of a source directory, built now if this machine has none for it yet."""
    # MAX imports a package by its file name: it must stay the source directory's name.
    target = cache_dir() / _source_hash(source) / f"{source.name}.mojoc"
    if target.exists():
        return target
    compiler = mojo_compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a scratch directory under its final name (the package records it), then
    # renamed: a concurrent build or a crash never leaves half a package at the target.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        done = subprocess.run(
            [str(compiler), "precompile", str(source), "-o", str(partial)],
            capture_output=True,
            text=True,
            # An explicit env: importing MAX setenv()s MODULAR_* variables behind
            # os.environ's back, and the compiler's launcher fails under them.
            env=dict(os.environ),
        )
        if done.returncode != 0:
            raise KernelBuildError(
                f"building the Mojo op {source.name} failed ({compiler} precompile):\n"
                + done.stderr.strip()
            )
        os.replace(partial, target)
    return target


def mojo_compiler() -> Path:
    """The `mojo` compiler of this environment; KernelBuildError saying how to get one."""
    beside_python = Path(sys.executable).parent / "mojo"
    found = beside_python if beside_python.exists() else shutil.which("mojo")
    if not found:
        raise KernelBuildError(
            "the Mojo compiler `mojo` was not found beside this Python or on PATH; it comes "
            "with the max wheel (pip install 'max>=26.7,<26.8' installs mojo-compiler). "
            "Or run without batchgen's kernel: --kv-cache paged"
        )
    return Path(found)


def _source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    for name in ("max", "mojo-compiler"):
        digest.update(f"{name}={_version(name)};".encode())
    for file in sorted(source.rglob("*.mojo")):
        digest.update(file.relative_to(source).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def standalone_slot_attention(heads: int, cache_dtype: str = "float32"):
    """slot_attention alone in a graph, for tests and the benchmark: (q, k, v [T, heads, D],
    k_cache, v_cache [slots, heads, maxlen, D], row_offsets, slots, starts, prefix_slots,
    prefix_lens) -> [T, heads, D]."""
    from max.dtype import DType
    from max.experimental import compilation
    from max.graph import BufferType, DeviceRef, TensorType

    from batchgen.engine.model import slot_attention

    def attend(q, k, v, k_cache, v_cache, row_offsets, slots, starts, prefix_slots, prefix_lens):
        caches = {"k_cache": k_cache, "v_cache": v_cache}
        rows = {"row_offsets": row_offsets, "slots": slots, "starts": starts}
        rows |= {"prefix_slots": prefix_slots, "prefix_lens": prefix_lens}
        return slot_attention(q, k, v, **caches, **rows)

    cpu = DeviceRef.CPU()
    tokens = TensorType(DType.float32, ["tokens", heads, "head_dim"], device=cpu)
    cache = BufferType(DType[cache_dtype], ["slots", heads, "maxlen", "head_dim"], device=cpu)
    per_row = TensorType(DType.int64, ["rows"], device=cpu)
    offsets = TensorType(DType.uint32, ["rows_plus_one"], device=cpu)
    compile_graph = compilation.compile(
        attend, name=f"slot_attention_{cache_dtype}", custom_extensions=[built_package()]
    )
    return compile_graph(tokens, tokens, tokens, cache, cache, offsets, *[per_row] * 4)
