"""Start and stop the services the tests need: a private dockerd, moto's S3 server, the IMDS emulator.

`.ci/run` calls `python tests/services.py start|stop --state DIR` around the test run and the
fixtures read the endpoints from the environment it writes; a developer who runs pytest without
it gets the same services started by the fixtures themselves, through the same functions.
"""

import argparse
import socket
import subprocess
import sys
from pathlib import Path

from mmshim.localdocker import start_dockerd, stop_dockerd, stop_pidfile, wait_for

VENV_PY = sys.executable
# install/setup-host.sh installs CRIU in /usr/local/sbin: a runtime with this PATH finds runc, not CRIU.
NO_CRIU_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


E2E_BUCKET = "mmshim-e2e"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def write_mmshim_config(path: Path, s3: str, imds: str, docker_host: str) -> Path:
    """The host config the runtime under the test dockerd reads: S3 on moto, the IMDS emulator."""
    state = path.parent
    path.write_text(
        f'store = "s3://{E2E_BUCKET}/mmshim"\n'
        f'store_options = {{ endpoint_url = "{s3}", region = "us-east-1", max_attempts = 2 }}\n'
        f'workdir = "{state / "work"}"\nlog_dir = "{state / "log"}"\n'
        f'imds_endpoint = "{imds}"\nimds_poll = 0.5\ndocker_host = "{docker_host}"\n'
    )
    return path


def start_all(state: Path) -> dict[str, str]:
    import boto3

    state.mkdir(parents=True, exist_ok=True)
    s3, imds = start_s3(state), start_imds(state)
    keys = {k.lower(): v for k, v in FAKE_AWS.items() if "KEY" in k}
    boto3.client("s3", endpoint_url=s3, region_name="us-east-1", **keys).create_bucket(Bucket=E2E_BUCKET)
    docker_host = f"unix://{state / 'docker' / 'docker.sock'}"
    config = write_mmshim_config(state / "mmshim.toml", s3, imds, docker_host)
    # The same host with its store down (a closed port): protected jobs must still run.
    dead = write_mmshim_config(state / "mmshim-deadstore.toml", "http://127.0.0.1:1", imds, docker_host)
    variants = {
        "mmshim-norunc": {"MMSHIM_RUNC": "/nonexistent/runc"},
        "mmshim-deadstore": {"MMSHIM_CONFIG": str(dead)},
        "mmshim-nocriu": {"PATH": NO_CRIU_PATH},
    }
    env = {
        "MMSHIM_TEST_S3_ENDPOINT": s3,
        "MMSHIM_TEST_IMDS_ENDPOINT": imds,
        "MMSHIM_TEST_CONFIG": str(config),
        "MMSHIM_TEST_DOCKER_HOST": start_dockerd(
            state / "docker", {"MMSHIM_CONFIG": str(config), **FAKE_AWS}, variants
        ),
    }
    (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def stop_all(state: Path) -> None:
    stop_dockerd(state / "docker")
    for name in ("moto", "imds"):
        stop_pidfile(state / f"{name}.pid", timeout=10)


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
