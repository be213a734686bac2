"""Fixtures for tests on the real thing: a dockerd with mmshim registered, and a local test image."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmshim.localdocker import Docker, build_image
from tests import services


@pytest.fixture(scope="session")
def services_env() -> Iterator[dict[str, str]]:
    """The services `.ci/run` started, or the same ones started here (tests/services.py)."""
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("needs root and dockerd: run install/setup-host.sh")
    if os.environ.get("MMSHIM_TEST_DOCKER_HOST"):
        yield dict(os.environ)
        return
    state = Path(tempfile.mkdtemp(prefix="mmd-", dir="/tmp"))
    mp = pytest.MonkeyPatch()
    try:
        for key, value in services.start_all(state).items():
            mp.setenv(key, value)
        yield dict(os.environ)
    finally:
        services.stop_all(state)
        mp.undo()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def docker(services_env: dict[str, str]) -> Docker:
    d = Docker(services_env["MMSHIM_TEST_DOCKER_HOST"])
    with tempfile.TemporaryDirectory() as tmp:
        build_image(d, Path(tmp))
    return d
