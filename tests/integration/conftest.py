"""Fixtures for tests on the real thing: a dockerd with mmshim registered, and a local test image."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmshim.localdocker import Docker, build_image, start_dockerd, stop_dockerd


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("needs root and dockerd: run install/setup-host.sh")
    state = None
    host = os.environ.get("MMSHIM_TEST_DOCKER_HOST")
    if not host:
        state = Path(tempfile.mkdtemp(prefix="mmd-", dir="/tmp"))
        host = start_dockerd(state)
    d = Docker(host)
    with tempfile.TemporaryDirectory() as tmp:
        build_image(d, Path(tmp))
    yield d
    if state:
        stop_dockerd(state)
        shutil.rmtree(state, ignore_errors=True)
