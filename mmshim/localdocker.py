"""A private dockerd with mmshim registered: for the demo, the tests and the benchmarks on one machine.

It runs with its own data-root, exec-root and socket, `"bridge": "none"` and no iptables rules, so it
never touches a host's real Docker set-up, and it registers mmshim beside runc.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
MMSHIM = os.environ.get("MMSHIM_BIN", "/usr/local/bin/mmshim")
IMAGE = "mmshim-test/busybox:1"
T = TypeVar("T")
BUSYBOX = "/bin/busybox"


def wait_for(check: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.2) -> T:
    """Poll until check() is truthy and return its value; the one polling loop of demo, tests, bench."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_dockerd(
    state: Path, env: dict[str, str] | None = None, variants: dict[str, dict[str, str]] | None = None
) -> str:
    """A dockerd of our own (own data-root, exec-root, socket), bridge none, mmshim registered.

    `variants` registers more runtimes: mmshim with extra environment (a missing runc, a dead
    store), to show how such failures reach `docker run`.
    """
    state.mkdir(parents=True, exist_ok=True)
    sock = state / "docker.sock"
    config = {
        "data-root": str(state / "data"),
        "exec-root": str(state / "exec"),
        "pidfile": str(state / "dockerd.pid"),
        "hosts": [f"unix://{sock}"],
        "bridge": "none",
        "iptables": False,
        "ip-forward": False,
        "experimental": True,
        "storage-driver": "overlay2",
        "runtimes": {"mmshim": {"path": MMSHIM}},
    }
    for name, extra in (variants or {}).items():
        wrapper = state / name
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items())
        wrapper.write_text(f'#!/bin/sh\n{assignments} exec {MMSHIM} "$@"\n')
        wrapper.chmod(0o755)
        config["runtimes"][name] = {"path": str(wrapper)}
    (state / "daemon.json").write_text(json.dumps(config, indent=2))
    log = open(state / "dockerd.log", "ab")  # noqa: SIM115 - handed to the daemon
    subprocess.Popen(
        ["dockerd", "--config-file", str(state / "daemon.json")],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    host = f"unix://{sock}"
    wait_for(
        lambda: subprocess.run([DOCKER, "-H", host, "version"], capture_output=True).returncode == 0,
        f"dockerd (log: {state / 'dockerd.log'})",
    )
    return host


def stop_pidfile(pidfile: Path, timeout: float = 30.0) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def stop_dockerd(state: Path) -> None:
    host = f"unix://{state / 'docker.sock'}"
    ids = subprocess.run([DOCKER, "-H", host, "ps", "-aq"], capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run([DOCKER, "-H", host, "rm", "-f", *ids], capture_output=True)
    stop_pidfile(state / "dockerd.pid")
    # dockerd leaves overlay and netns mounts when killed: unmount what lies under our state dir.
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(str(state))), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@dataclass
class Docker:
    host: str

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [DOCKER, "-H", self.host, *args], capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def out(self, *args: str) -> str:
        return self.run(*args).stdout

    @property
    def runc_root(self) -> str:
        """runc's state root for this dockerd's containers (20.10 gives every runtime runc's,
        under the exec-root that start_dockerd puts beside the socket)."""
        return str(Path(self.host.removeprefix("unix://")).parent / "exec" / "runtime-runc" / "moby")

    def wait_logs(self, cid: str, text: str, timeout: float = 300) -> None:
        wait_for(lambda: text in self.out("logs", cid), f"{cid[:12]} to print {text!r}", timeout)

    def run_job(
        self,
        job_id: str,
        attempt: int,
        argv: list[str],
        env: dict[str, str] | None = None,
        image: str = IMAGE,
        docker_args: tuple[str, ...] = (),
        network: str = "none",
    ) -> str:
        """`docker run -d` of a Batch job as Batch would start it, on mmshim; returns the container id."""
        pairs = {"AWS_BATCH_JOB_ID": job_id, "AWS_BATCH_JOB_ATTEMPT": str(attempt), **(env or {})}
        flags = [x for k, v in pairs.items() for x in ("-e", f"{k}={v}")]
        return self.out(
            "run", "-d", "--runtime=mmshim", "--network", network, *docker_args, *flags, image, *argv
        ).strip()


def build_image(docker: Docker, tmp: Path, name: str = IMAGE, extra: dict[str, Path] | None = None) -> None:
    """A busybox rootfs made on the spot (no registry is reachable from here), plus `extra` files
    (path in the image -> file on the host), such as a static test program."""
    if docker.run("image", "inspect", name, check=False).returncode == 0:
        return
    rootfs = tmp / f"rootfs-{name.replace('/', '-').replace(':', '-')}"
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
    for dest, source in (extra or {}).items():
        shutil.copy2(source, rootfs / dest.lstrip("/"))
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    docker.run("import", "--change", 'CMD ["/bin/sh"]', "-", name, stdin=tar.stdout)
    tar.wait()
