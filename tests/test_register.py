"""install/register-runtime.py keeps other settings, validates, backs up and undoes cleanly."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "install" / "register-runtime.py"


def register(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_docker_merge_default_and_remove(tmp_path: Path) -> None:
    daemon = tmp_path / "daemon.json"
    original = {
        "log-driver": "json-file",
        "default-runtime": "nvidia",
        "runtimes": {"nvidia": {"path": "/n"}},
    }
    daemon.write_text(json.dumps(original))
    pidfile = tmp_path / "none.pid"
    assert register("docker", "--default", "--config", str(daemon), "--pidfile", str(pidfile)).returncode == 0
    merged = json.loads(daemon.read_text())
    assert merged["runtimes"] == {"nvidia": {"path": "/n"}, "mmshim": {"path": "/usr/local/bin/mmshim"}}
    assert merged["default-runtime"] == "mmshim"
    assert merged["log-driver"] == "json-file"
    assert len(list(tmp_path.glob("daemon.json.bak-*"))) == 1
    assert register("docker", "--default", "--config", str(daemon)).returncode == 0  # idempotent
    assert json.loads(daemon.read_text()) == merged
    assert register("docker", "--remove", "--config", str(daemon), "--pidfile", str(pidfile)).returncode == 0
    assert json.loads(daemon.read_text()) == original


def test_docker_fresh_file_and_sighup(tmp_path: Path) -> None:
    daemon = tmp_path / "etc" / "daemon.json"
    sleeper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal,sys,time; signal.signal(signal.SIGHUP, lambda *a: sys.exit(7)); "
            "print('ready', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    assert sleeper.stdout.readline() == b"ready\n"
    pidfile = tmp_path / "dockerd.pid"
    pidfile.write_text(str(sleeper.pid))
    assert register("docker", "--config", str(daemon), "--pidfile", str(pidfile)).returncode == 0
    assert json.loads(daemon.read_text()) == {"runtimes": {"mmshim": {"path": "/usr/local/bin/mmshim"}}}
    assert sleeper.wait(timeout=10) == 7  # dockerd was told to reload
    assert (
        register("docker", "--remove", "--config", str(daemon), "--pidfile", str(tmp_path / "x")).returncode
        == 0
    )
    assert json.loads(daemon.read_text()) == {}


def test_docker_invalid_json_left_alone(tmp_path: Path) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_text('{"runtimes": ')
    proc = register("docker", "--config", str(daemon))
    assert proc.returncode == 1
    assert "not valid JSON" in proc.stderr
    assert daemon.read_text() == '{"runtimes": '


def test_docker_missing_executable(tmp_path: Path) -> None:
    proc = register("docker", "--config", str(tmp_path / "d.json"), "--path", str(tmp_path / "nope"))
    assert proc.returncode == 1 and "not executable" in proc.stderr
    assert not (tmp_path / "d.json").exists()


def test_containerd_add_and_remove(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    original = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "pause:3.9"\n'
    config.write_text(original)
    assert register("containerd", "--config", str(config)).returncode == 0
    parsed = tomllib.loads(config.read_text())
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "pause:3.9"
    runtime = cri["containerd"]["runtimes"]["mmshim"]
    assert runtime == {
        "runtime_type": "io.containerd.runc.v2",
        "options": {"BinaryName": "/usr/local/bin/mmshim"},
    }
    before = config.read_text()
    assert register("containerd", "--config", str(config)).returncode == 0
    assert config.read_text() == before  # idempotent: one block
    assert register("containerd", "--remove", "--config", str(config)).returncode == 0
    assert config.read_text() == original


def test_containerd_invalid_toml_left_alone(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = [\n")
    proc = register("containerd", "--config", str(config))
    assert proc.returncode == 1 and "not be valid TOML" in proc.stderr
    assert config.read_text() == "version = [\n"
