"""The README's main job, run as `make demo` runs it, with its result asserted."""

import subprocess
import sys

import pytest

from mmshim.demo import expected

pytestmark = pytest.mark.integration


def test_demo_resumes_and_finishes_like_an_uninterrupted_run(services_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mmshim.demo", "--steps", "30", "--interval", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "".join(f"    {line}\n" for line in expected(30)) in out
    for event in ("checkpoint.committed", "spot.notice", "restore.succeeded"):
        assert event in out
    assert "[demo] result: same output as an uninterrupted run" in out
