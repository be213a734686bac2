"""The runtime's argv parsing, runc discovery and error reporting, without dockerd."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmshim import runtime
from mmshim.runtime import UsageError, parse

MMSHIM = os.environ.get("MMSHIM_BIN", "/usr/local/bin/mmshim")


@pytest.mark.parametrize(
    "argv",
    [
        ["--root", "/r", "--log", "/l", "--log-format", "json", "--systemd-cgroup", "create", "c1"],
        ["--root=/r", "--log=/l", "--log-format=json", "--systemd-cgroup", "create", "c1"],
        ["-root", "/r", "-log=/l", "-log-format", "json", "--systemd-cgroup=true", "create", "c1"],
    ],
)
def test_global_flag_forms(argv: list[str]) -> None:
    inv = parse(argv)
    assert inv.global_flags == {"root": "/r", "log": "/l", "log-format": "json", "systemd-cgroup": True}
    assert inv.command == "create" and inv.container_id == "c1"
    assert inv.global_argv == argv[:-2]


def test_every_global_flag() -> None:
    inv = parse(["--debug", "--criu", "/c", "--rootless", "auto", "--root", "/r", "state", "x"])
    assert inv.global_flags == {"debug": True, "criu": "/c", "rootless": "auto", "root": "/r"}
    assert inv.command == "state" and inv.command_args == ["x"]
    assert inv.root == "/r"


@pytest.mark.parametrize(
    ("args", "bundle"),
    [
        (["--bundle", "/b"], "/b"),
        (["-b", "/b"], "/b"),
        (["--bundle=/b"], "/b"),
        (["-b=/b"], "/b"),
        ([], None),
    ],
)
def test_bundle_forms(args: list[str], bundle: str | None, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    inv = parse(["create", *args, "--pid-file", "p.pid", "--console-socket=/s.sock", "c1"])
    assert inv.bundle == (bundle or str(tmp_path))  # no bundle flag: the current directory
    assert inv.pid_file == str(tmp_path / "p.pid")
    assert inv.console_socket == "/s.sock"
    assert inv.container_id == "c1"


def test_create_flags_and_id_anywhere() -> None:
    inv = parse(["create", "c1", "--no-pivot", "--no-new-keyring", "--preserve-fds", "2", "-b", "/b"])
    assert inv.container_id == "c1"
    assert inv.flags == {"no-pivot": True, "no-new-keyring": True, "preserve-fds": "2", "bundle": "/b"}


def test_delete_force_forms() -> None:
    assert parse(["delete", "-f", "c1"]).flags == {"force": True}
    assert parse(["delete", "--force", "c1"]).flags == {"force": True}
    assert parse(["delete", "c1"]).flags == {}


@pytest.mark.parametrize(
    "argv",
    [["create", "--bogus", "c1"], ["create"], ["create", "a", "b"], ["create", "--bundle"], ["start"]],
)
def test_unusual_intercepted_argv_is_refused(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(argv)


def test_unknown_global_flag_is_left_to_runc() -> None:
    inv = parse(["--future-flag", "create", "c1"])
    assert inv.command is None  # never intercepted: runc judges it


def test_find_runc_order(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "bin" / "runc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    other = tmp_path / "other-runc"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    config = tmp_path / "config.toml"
    monkeypatch.setattr(runtime, "CONFIG_FILE", str(config))
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.delenv("MMSHIM_RUNC", raising=False)
    assert runtime.find_runc() == str(fake)
    config.write_text(f'runc = "{other}"\n')
    assert runtime.find_runc() == str(other)
    monkeypatch.setenv("MMSHIM_RUNC", str(fake))
    assert runtime.find_runc() == str(fake)
    monkeypatch.setenv("MMSHIM_RUNC", str(tmp_path / "missing"))
    with pytest.raises(runtime.RuncNotFound, match="not an executable file"):
        runtime.find_runc()


def test_find_runc_skips_itself(tmp_path: Path, monkeypatch) -> None:
    """mmshim installed under the name runc must not exec itself forever."""
    self_dir, real_dir = tmp_path / "a", tmp_path / "b"
    self_dir.mkdir()
    real_dir.mkdir()
    (self_dir / "runc").symlink_to(MMSHIM)
    (real_dir / "runc").symlink_to("/usr/sbin/runc")
    monkeypatch.setattr(runtime, "CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.delenv("MMSHIM_RUNC", raising=False)
    monkeypatch.setenv("PATH", f"{self_dir}:{real_dir}")
    monkeypatch.setattr(sys, "argv", [str(self_dir / "runc")])
    assert runtime.find_runc() == str(real_dir / "runc")
    monkeypatch.setenv("PATH", str(self_dir))
    with pytest.raises(runtime.RuncNotFound, match="no runc found"):
        runtime.find_runc()


def run_mmshim(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MMSHIM, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, **kw
    )


def fake_runc(tmp_path: Path) -> Path:
    script = tmp_path / "fake-runc"
    script.write_text(
        '#!/bin/sh\necho "pid=$$ args=$*"; [ -n "$MMSHIM_SELF" ] && echo python; cat; exit 42\n'
    )
    script.chmod(0o755)
    return script


def test_passthrough_execs_runc(tmp_path: Path) -> None:
    """Same pid, stdin, args and exit status: the runtime became runc."""
    proc = subprocess.Popen(
        [MMSHIM, "--root", "/r", "state", "c1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MMSHIM_RUNC": str(fake_runc(tmp_path))},
    )
    out, _ = proc.communicate("from stdin")
    assert proc.returncode == 42
    assert out == f"pid={proc.pid} args=--root /r state c1\nfrom stdin"


def test_version_names_both() -> None:
    out = run_mmshim("--version").stdout
    assert out.startswith("mmshim version ")
    assert "runc version" in out


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_missing_runc_is_logged_for_containerd(tmp_path: Path, fmt: str) -> None:
    log = tmp_path / "log.json"
    proc = run_mmshim(
        "--log",
        str(log),
        "--log-format",
        fmt,
        "create",
        "--bundle",
        str(tmp_path),
        "c1",
        env={"MMSHIM_RUNC": "/nonexistent/runc"},
    )
    assert proc.returncode == 1
    assert "/nonexistent/runc" in proc.stderr
    line = log.read_text().strip()
    if fmt == "json":
        record = json.loads(line)
        assert record["level"] == "error" and "/nonexistent/runc is not an executable file" in record["msg"]
    else:
        assert line.startswith("level=error") and "/nonexistent/runc" in line


@pytest.mark.parametrize("content", [None, b'{"AWS_BATCH_JOB_ID=x" not json', b'["AWS_BATCH_JOB_ID=x"]'])
def test_unreadable_config_json(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / "config.json").write_bytes(content)
    log = tmp_path / "log.json"
    proc = run_mmshim(
        "--log",
        str(log),
        "--log-format",
        "json",
        "create",
        "--bundle",
        str(tmp_path),
        "c1",
        env={"MMSHIM_RUNC": str(fake_runc(tmp_path))},
    )
    assert proc.returncode == 1
    assert "config.json" in json.loads(log.read_text())["msg"]
    assert "pid=" not in proc.stdout  # runc was never run


def test_passthrough_imports_nothing_heavy() -> None:
    """The hot path: only the standard library modules it needs (no click, boto3, logging)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r});"
        "sys.argv=['mmshim','state','x'];"
        "import mmshim.runtime as r; r.exec_runc=lambda *a: None; r.find_runc=lambda: '/bin/true';"
        "r.main(); print(' '.join(sorted(sys.modules)))"
    )
    mods = subprocess.run(
        [sys.executable, "-IS", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    for heavy in ("click", "boto3", "botocore", "logging", "json", "pythonjsonlogger", "mmshim.lifecycle"):
        assert heavy not in mods


def bundle_with_env(tmp_path: Path, *env: str) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"env": ["PATH=/bin", *env]}}))
    return bundle


@pytest.mark.parametrize(
    ("argv", "env", "python"),
    [
        (["--root", "R", "--log=L", "create", "-b", "B", "--pid-file", "P", "c1"], [], False),
        (["--root", "R", "create", "--bundle=B", "c1"], ["AWS_BATCH_JOB_ID=j1", "MMSHIM_PROTECT=0"], True),
        (["create", "-b", "B", "c1"], ["MMSHIM_JOB_ID=j1", "MMSHIM_PROTECT=false"], True),
        (["--root", "R", "start", "c1"], [], False),
        (["--root", "R", "delete", "--force", "c1"], [], False),
        (["--root", "R", "state", "c1"], [], False),
        (["--future-flag", "state", "c1"], [], True),
        (["create", "--future-flag", "-b", "B", "c1"], [], True),
    ],
)
def test_launcher_fast_path(tmp_path: Path, argv: list[str], env: list[str], python: bool) -> None:
    """The shell launcher execs runc itself unless mmshim has something to do or argv is unusual."""
    bundle = bundle_with_env(tmp_path, *env)
    root = tmp_path / "root"
    (root / "restored").mkdir(parents=True)
    (root / "restored" / "mmshim.restored").write_text("20261127T000000.000Z-abcdef")
    argv = [a.replace("B", str(bundle)) if a.endswith("B") else str(root) if a == "R" else a for a in argv]
    proc = subprocess.Popen(
        [MMSHIM, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "MMSHIM_RUNC": str(fake_runc(tmp_path))},
    )  # fmt: skip
    out, _ = proc.communicate()
    assert proc.returncode == 42
    assert out.splitlines()[0] == f"pid={proc.pid} args={' '.join(argv)}"
    assert ("python" in out.splitlines()) == python


def test_launcher_skips_itself_on_path(tmp_path: Path) -> None:
    """mmshim installed as `runc` first on PATH: the launcher finds the real one after it."""
    first, real = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    real.mkdir()
    (first / "runc").symlink_to(MMSHIM)
    (real / "runc").symlink_to(fake_runc(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "MMSHIM_RUNC"}
    proc = subprocess.run(
        [str(first / "runc"), "state", "x"],
        capture_output=True,
        text=True,
        env={**env, "PATH": f"{first}:{real}"},
    )
    assert proc.returncode == 42 and "args=state x" in proc.stdout
    proc = subprocess.run(
        [str(first / "runc"), "--log", str(tmp_path / "log"), "state", "x"],
        capture_output=True, text=True, env={**env, "PATH": str(first)},
    )  # fmt: skip
    assert proc.returncode == 1 and "no runc found" in proc.stderr


def test_start_after_restore_is_a_noop(tmp_path: Path) -> None:
    """The process was restored at create and runs already: `start` must not run runc."""
    root = tmp_path / "root"
    (root / "c1").mkdir(parents=True)
    (root / "c1" / "mmshim.restored").write_text("20261127T000000.000Z-abcdef")
    proc = run_mmshim("--root", str(root), "start", "c1", env={"MMSHIM_RUNC": str(fake_runc(tmp_path))})
    assert (proc.returncode, proc.stdout) == (0, "")
    (root / "c1" / "mmshim.restored").unlink()
    assert (
        run_mmshim(
            "--root", str(root), "start", "c1", env={"MMSHIM_RUNC": str(fake_runc(tmp_path))}
        ).returncode
        == 42
    )


@pytest.mark.parametrize("runc", ["/nonexistent/runc", "/tmp", MMSHIM])
def test_launcher_checks_mmshim_runc(tmp_path: Path, runc: str) -> None:
    """A bad $MMSHIM_RUNC reaches the Python runtime, which says what is wrong in runc's log."""
    log = tmp_path / "log.json"
    proc = run_mmshim("--log", str(log), "--log-format", "json", "state", "x", env={"MMSHIM_RUNC": runc})
    assert proc.returncode == 1
    assert runc in json.loads(log.read_text())["msg"]


def test_watcher_inputs_come_through_the_runtimes_pipe() -> None:
    """The runtime sends the watcher its state and the bundle's config.json (both deleted with the
    container); anything else gives (None, None), and the watcher reads the files itself."""
    from mmshim.lifecycle import json_dumps, watcher_inputs

    config = json.dumps({"process": {"env": ["AWS_BATCH_JOB_ID=j1"]}})
    state = {"job_id": "j1", "attempt": 2, "restored": None, "progress_base": 0.0, "started": 1.5}
    bundle, got = watcher_inputs((json_dumps(state) + "\n" + config).encode(), "/b")
    assert bundle is not None and (bundle.path, bundle.env) == ("/b", {"AWS_BATCH_JOB_ID": "j1"})
    assert got == state
    bundle, got = watcher_inputs(("null\n" + config).encode(), "/b")  # a --skip watcher: no state
    assert bundle is not None and got is None
    for payload in (b"", b"null\n", b"{}\n[1]", b"\xff\xfe"):  # the runtime died before it wrote
        assert watcher_inputs(payload, "/b") == (None, None)


@pytest.mark.parametrize("tty", [True, False])
def test_a_watcher_that_cannot_be_started_never_fails_the_create(
    tmp_path: Path, monkeypatch, capsys, tty: bool
) -> None:
    """No process to spare (posix_spawn fails): the container is created all the same, by runc,
    and the error says the watcher is missing."""
    from mmshim import lifecycle

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    env = ["AWS_BATCH_JOB_ID=j1", "AWS_BATCH_JOB_ATTEMPT=1"]
    (bundle / "config.json").write_text(json.dumps({"process": {"terminal": tty, "env": env}}))
    ran: list[list[str]] = []

    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    def exec_runc(runc: str, argv: list[str]) -> None:
        ran.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(lifecycle.os, "posix_spawn", no_process)
    monkeypatch.setattr(lifecycle, "exec_runc", exec_runc)
    monkeypatch.setattr(lifecycle, "spawn_wait", lambda argv: ran.append(argv[1:]) or 0)
    argv = ["--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"]
    with pytest.raises(SystemExit) as done:
        lifecycle.create(parse(argv), "/usr/sbin/runc")
    assert done.value.code == 0 and ran == [argv]
    assert "mmshim: watcher not started" in capsys.readouterr().err
