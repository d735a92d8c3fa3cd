"""The native test binary (tests/native/): partition maths, 3LC bodies (round trips through
every decoder path, the streamed decode's sizes and two outputs, malformed bodies) and
payload header/checksum checks, built from the core's own sources with CMake (or g++) and
run here. The codec is exercised below the Python API, where test-only bindings used to be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "native"))
from build_native_tests import build  # noqa: E402

SUITES = ["partition", "payload", "threelc"]


@pytest.fixture(scope="module")
def binary() -> Path:
    try:
        return build()
    except subprocess.CalledProcessError as error:
        pytest.fail(f"building the native tests failed:\n{error.stdout}\n{error.stderr}")


def test_the_binary_runs_exactly_these_suites(binary):
    listed = subprocess.run([str(binary), "list"], capture_output=True, text=True, check=True).stdout.split()
    assert listed == SUITES


@pytest.mark.parametrize("suite", SUITES)
def test_native_suite(binary, suite):
    result = subprocess.run([str(binary), "run", suite], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    failures = [line for line in lines if not line.startswith("PASS ")]
    assert result.returncode == 0 and not failures and lines, "\n".join(failures) + result.stderr
