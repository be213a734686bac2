"""Fixtures for tests on the real thing: a dockerd with mmshim registered, and a local test image."""

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import services

IMAGE = "mmshim-test/busybox:1"
BUSYBOX = "/bin/busybox"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@dataclass
class Docker:
    host: str

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [services.DOCKER, "-H", self.host, *args], capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def out(self, *args: str) -> str:
        return self.run(*args).stdout


def build_image(docker: Docker, tmp: Path) -> None:
    """A busybox rootfs made on the spot: no registry is reachable from here."""
    if docker.run("image", "inspect", IMAGE, check=False).returncode == 0:
        return
    rootfs = tmp / "rootfs"
    for d in ("bin", "tmp", "proc", "sys", "dev", "etc", "root", "var/tmp", "data"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (rootfs / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (rootfs / "etc/image-file").write_text("from the image\n")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    docker.run("import", "--change", 'CMD ["/bin/sh"]', "-", IMAGE, stdin=tar.stdout)
    tar.wait()


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("needs root and dockerd: run install/setup-host.sh")
    state = None
    host = os.environ.get("MMSHIM_TEST_DOCKER_HOST")
    if not host:
        state = Path(tempfile.mkdtemp(prefix="mmd-", dir="/tmp"))
        host = services.start_dockerd(state)
    d = Docker(host)
    with tempfile.TemporaryDirectory() as tmp:
        build_image(d, Path(tmp))
    yield d
    if state:
        services.stop_dockerd(state)
        shutil.rmtree(state, ignore_errors=True)
