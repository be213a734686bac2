"""Start and stop the services the tests need: a private dockerd, moto's S3 server, the IMDS emulator.

`.ci/run` calls `python tests/services.py start|stop --state DIR` around the test run and the
fixtures read the endpoints from the environment it writes; a developer who runs pytest without
it gets the same services started by the fixtures themselves, through the same functions.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
MMSHIM = os.environ.get("MMSHIM_BIN", "/usr/local/bin/mmshim")
VENV_PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def start_dockerd(state: Path) -> str:
    """A dockerd of our own (own data-root, exec-root, socket), bridge none, mmshim registered."""
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
        "runtimes": {"mmshim": {"path": MMSHIM}, "mmshim-norunc": {"path": str(state / "mmshim-norunc")}},
    }
    # A runtime whose runc is missing, to see how that failure reaches `docker run`.
    norunc = state / "mmshim-norunc"
    norunc.write_text(f'#!/bin/sh\nMMSHIM_RUNC=/nonexistent/runc exec {MMSHIM} "$@"\n')
    norunc.chmod(0o755)
    (state / "daemon.json").write_text(json.dumps(config, indent=2))
    log = open(state / "dockerd.log", "ab")  # noqa: SIM115 - handed to the daemon
    subprocess.Popen(
        ["dockerd", "--config-file", str(state / "daemon.json")],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    host = f"unix://{sock}"
    wait_for(
        lambda: subprocess.run([DOCKER, "-H", host, "version"], capture_output=True).returncode == 0,
        f"dockerd (log: {state / 'dockerd.log'})",
    )
    return host


def _stop_pidfile(pidfile: Path, timeout: float = 30.0) -> None:
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
    _stop_pidfile(state / "dockerd.pid")
    # dockerd leaves overlay and netns mounts when killed: unmount what lies under our state dir.
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(str(state))), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def start_background(state: Path, name: str, argv: list[str], port: int) -> str:
    """A loopback server as a detached process; returns its endpoint once it accepts connections."""
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / f"{name}.log", "ab")  # noqa: SIM115 - handed to the server
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    (state / f"{name}.pid").write_text(str(proc.pid))

    def accepting() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(accepting, f"{name} (log: {state / f'{name}.log'})")
    return f"http://127.0.0.1:{port}"


def start_s3(state: Path) -> str:
    port = free_port()
    moto = str(Path(VENV_PY).parent / "moto_server")
    return start_background(state, "moto", [moto, "-H", "127.0.0.1", "-p", str(port)], port)


def start_imds(state: Path) -> str:
    port = free_port()
    argv = [VENV_PY, "-m", "mmshim.imds_emulator", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return start_background(state, "imds", argv, port)


def start_all(state: Path) -> dict[str, str]:
    env = {
        "MMSHIM_TEST_DOCKER_HOST": start_dockerd(state / "docker"),
        "MMSHIM_TEST_S3_ENDPOINT": start_s3(state),
        "MMSHIM_TEST_IMDS_ENDPOINT": start_imds(state),
    }
    (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def stop_all(state: Path) -> None:
    stop_dockerd(state / "docker")
    for name in ("moto", "imds"):
        _stop_pidfile(state / f"{name}.pid", timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--state", type=Path, required=True)
    args = parser.parse_args()
    if args.action == "start":
        for key, value in start_all(args.state).items():
            print(f"{key}={value}")
    else:
        stop_all(args.state)


if __name__ == "__main__":
    main()
