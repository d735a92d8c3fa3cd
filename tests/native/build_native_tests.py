"""Builds the native test binary (tests/native/) from the core's own sources.

Used by tests/test_native.py and benchmarks/compression.py. CMake when it is on PATH,
otherwise g++ directly; incremental (the build directory is kept, build/native-tests by
default, which .gitignore covers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = ["main.cpp", "bench.cpp", "test_partition.cpp", "test_threelc.cpp", "test_payload.cpp"]
CORE_SOURCES = ["compression/threelc.cpp", "compression/payload.cpp", "compression/cast.cpp"]
FLAGS = ["-std=c++17", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-math-errno"]


def build(build_dir: Path | None = None, jobs: int = 2) -> Path:
    """Path of the built binary (raises CalledProcessError with the compiler's output)."""
    build_dir = Path(build_dir or ROOT / "build" / "native-tests")
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / "pbm_native_tests"
    run = dict(capture_output=True, text=True, check=True)
    if shutil.which("cmake"):
        subprocess.run(["cmake", "-S", str(HERE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"], **run)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs)], **run)
        return binary
    compiler = os.environ.get("CXX", "g++")
    inputs = [str(HERE / s) for s in SOURCES] + [str(ROOT / "csrc" / s) for s in CORE_SOURCES]
    subprocess.run([compiler, *FLAGS, f"-I{ROOT / 'csrc'}", f"-I{HERE}", *inputs, "-o", str(binary)], **run)
    return binary
