"""mmshimctl (mmshim.cli): store commands on a file:// store, errors, and checkpoint/restore with runc."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mmshim import cli as cli_mod
from mmshim import engine
from mmshim.cli import Meter, cli, fetch_meter
from mmshim.store import CheckpointInfo, CheckpointUnusable, Store, open_store

JOB_A = "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
JOB_B = "job-events-only"
JOB_C = "job-with-bad:1"
CHUNK = 64 * 1024


def make_src(root: Path, name: str, data: bytes) -> Path:
    src = root / name
    (src / "criu").mkdir(parents=True)
    (src / "criu" / "pages-1.img").write_bytes(data)
    (src / "rootfs.tar").write_bytes(b"layer " + name.encode())
    return src


def meta(trigger: str, attempt: int = 1) -> dict[str, Any]:
    return {
        "job_id": JOB_A,
        "attempt": attempt,
        "trigger": trigger,
        "container_id": "c0ffee",
        "host": "ip-10-0-0-1",
        "args": ["sh", "-c", "work"],
        "progress_s": 42.5,
        "timings": {"layer_s": 0.012, "paused_s": 0.34},
        "frozen_s": 0.21,
        "memdump_s": 0.05,
        "pages_written": 77,
        "versions": {"kernel": "6.1.0", "runc": "runc version 1.1.5", "criu": "Version: 4.0"},
        "layer": {"files": 3, "bytes": 1234, "aligned": {"2049:77:8388608:1:2": [1, 2]}},
        "mounts": [],
    }


class Filled:
    """A file:// store with job A (two good checkpoints), B (events only), C (one damaged)."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "store"
        self.url = f"file://{self.path}"
        self.store: Store = open_store(self.url, chunk_size=CHUNK)
        src = tmp / "src"
        self.a1 = self.store.save(JOB_A, make_src(src, "a1", os.urandom(3 * CHUNK)), meta("interval"))
        self.a2 = self.store.save(JOB_A, make_src(src, "a2", os.urandom(2 * CHUNK)), meta("spot"))
        for name, extra in (("start", {"attempt": 1}), ("checkpoint.committed", {"checkpoint_id": "x"})):
            self.store.put_event(JOB_A, {"time": time.time(), "event": name, "job_id": JOB_A, **extra})
        self.store.put_event(JOB_B, {"time": time.time(), "event": "start", "job_id": JOB_B})
        self.c1 = self.store.save(JOB_C, make_src(src, "c1", os.urandom(CHUNK)), {"trigger": "interval"})
        manifest = self.path / "jobs" / JOB_C / "checkpoints" / f"{self.c1.checkpoint_id}.json"
        manifest.write_bytes(manifest.read_bytes()[:40])  # damaged: shows as bad


@pytest.fixture
def filled(tmp_path: Path) -> Filled:
    return Filled(tmp_path)


@pytest.fixture
def config(tmp_path: Path, filled: Filled) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'store = "{filled.url}"\nworkdir = "{tmp_path / "work"}"\n')
    return path


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], prog_name="mmshimctl")


def assert_clean_error(result: Result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    for w in words:
        assert w in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# ls


def test_ls_table(config: Path, filled: Filled) -> None:
    result = run(config, "ls")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["JOB", "CHECKPOINT", "STATE", "SIZE", "STORED", "AGE", "TRIGGER"]
    rows = {line.split()[1]: line.split() for line in lines[1:] if line.startswith(JOB_A)}
    assert list(rows) == [filled.a2.checkpoint_id, filled.a1.checkpoint_id]  # newest first
    row = rows[filled.a1.checkpoint_id]
    assert row[2] == "good" and row[3:5] == ["192.0", "KiB"] and row[-1] == "interval"
    assert rows[filled.a2.checkpoint_id][-1] == "spot"
    assert any(line.startswith(JOB_B) and "(no checkpoints)" in line for line in lines)
    bad = next(line.split() for line in lines if line.startswith(JOB_C))
    assert bad[1:3] == [filled.c1.checkpoint_id, "bad"]


def test_ls_json(config: Path, filled: Filled) -> None:
    result = run(config, "--json", "ls")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [j["job_id"] for j in data] == sorted([JOB_A, JOB_B, JOB_C])
    a = next(j for j in data if j["job_id"] == JOB_A)["checkpoints"]
    assert [c["checkpoint_id"] for c in a] == [filled.a2.checkpoint_id, filled.a1.checkpoint_id]
    first = a[1]
    assert first["state"] == "good" and first["trigger"] == "interval" and first["attempt"] == 1
    assert first["size"] == filled.a1.size and first["stored"] == filled.a1.stored
    assert first["created"] == pytest.approx(filled.a1.created) and 0 <= first["age_s"] < 60
    assert next(j for j in data if j["job_id"] == JOB_B)["checkpoints"] == []


def test_ls_one_job(config: Path, filled: Filled) -> None:
    result = run(config, "--json", "ls", JOB_A)
    assert result.exit_code == 0, result.output
    assert [j["job_id"] for j in json.loads(result.stdout)] == [JOB_A]
    assert_clean_error(run(config, "ls", "no-such-job"), "no job no-such-job")


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_job(config: Path, filled: Filled) -> None:
    result = run(config, "inspect", JOB_A)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"job {JOB_A}" in out and "checkpoints (2):" in out and "events (2):" in out
    assert filled.a1.checkpoint_id in out and filled.a2.checkpoint_id in out
    assert " start  attempt=1" in out and "checkpoint.committed  checkpoint_id=x" in out

    data = json.loads(run(config, "--json", "inspect", JOB_A).stdout)
    assert data["job_id"] == JOB_A
    assert [e["event"] for e in data["events"]] == ["start", "checkpoint.committed"]
    assert data["checkpoints"][1]["meta"] == meta("interval")


def test_inspect_checkpoint(config: Path, filled: Filled) -> None:
    target = f"{JOB_A}/{filled.a1.checkpoint_id}"
    result = run(config, "inspect", target)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"checkpoint {target}\n")
    for text in (
        "state         good",
        "trigger       interval",
        "args          sh -c work",
        "progress_s    42.500 s",
        "timings:\n  layer_s   0.012 s\n  paused_s  0.340 s",
        "criu:\n  frozen_s       0.210 s",
        "pages_written  77",
        "versions:",
        "criu    Version: 4.0",
        "layer:",
        "aligned  1 files",  # not each one's identity
    ):
        assert text in out, (text, out)

    data = json.loads(run(config, "--json", "inspect", target).stdout)
    assert data["checkpoint_id"] == filled.a1.checkpoint_id and data["state"] == "good"
    assert data["meta"] == meta("interval") and data["size"] == filled.a1.size


def test_inspect_bad_checkpoint_gives_reason(config: Path, filled: Filled) -> None:
    result = run(config, "--json", "inspect", f"{JOB_C}/{filled.c1.checkpoint_id}")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["state"] == "bad" and "damaged" in data["reason"]
    human = run(config, "inspect", f"{JOB_C}/{filled.c1.checkpoint_id}").stdout
    assert "state    bad (" in human


def test_inspect_errors(config: Path, filled: Filled) -> None:
    assert_clean_error(run(config, "inspect", "../x"), "'../x'", "job id '..'")
    assert_clean_error(run(config, "inspect", "unknown-job"), "no job unknown-job")
    missing = "20200101T000000.000Z-abcdef"
    assert_clean_error(run(config, "inspect", f"{JOB_A}/{missing}"), f"no checkpoint {missing}")
    assert_clean_error(run(config, "inspect", f"{JOB_A}/nonsense"), "invalid checkpoint id")
    result = run(config, "--json", "inspect", f"{JOB_A}/{missing}")
    assert result.exit_code == 2 and result.stdout == ""
    assert json.loads(result.stderr)["type"] == "CheckpointNotFound"


# ---------------------------------------------------------------------------------------------
# rm and gc


def test_rm_checkpoint_then_job(config: Path, filled: Filled) -> None:
    result = run(config, "rm", JOB_A, filled.a1.checkpoint_id)
    assert result.exit_code == 0, result.output
    assert f"deleted checkpoint {JOB_A}/{filled.a1.checkpoint_id}" in result.stdout
    assert [i.checkpoint_id for i in filled.store.checkpoints(JOB_A)] == [filled.a2.checkpoint_id]
    assert_clean_error(run(config, "rm", JOB_A, filled.a1.checkpoint_id), "no checkpoint")

    result = run(config, "--json", "rm", JOB_A)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "deleted": {"job_id": JOB_A, "checkpoints": [filled.a2.checkpoint_id]}
    }
    assert JOB_A not in filled.store.jobs() and filled.store.events(JOB_A) == []
    assert_clean_error(run(config, "rm", JOB_A), f"no job {JOB_A}")


def test_rm_job_slash_checkpoint_and_bad_ids(config: Path, filled: Filled) -> None:
    result = run(config, "rm", f"{JOB_A}/{filled.a2.checkpoint_id}")
    assert result.exit_code == 0, result.output
    assert [i.checkpoint_id for i in filled.store.checkpoints(JOB_A)] == [filled.a1.checkpoint_id]
    assert_clean_error(run(config, "rm", "../x"), "job id")
    assert_clean_error(run(config, "rm", "a/b/c"), "invalid checkpoint id")
    assert JOB_A in filled.store.jobs()


def test_gc_counts(config: Path, filled: Filled) -> None:
    result = run(config, "--json", "gc")  # default grace (6 h): everything is young
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    unique = 3 + 1 + 2 + 1 + 1 + 1  # a1: 3 pages + layer, a2: 2 + layer, c1: 1 + layer
    assert data["chunks"] == unique and data["deleted"] == 0 and data["grace_seconds"] == 6 * 3600
    assert data["referenced"] == 3 + 1 + 2 + 1  # the damaged manifest references nothing
    assert data["young"] == 2

    assert run(config, "rm", JOB_A, filled.a1.checkpoint_id).exit_code == 0
    result = run(config, "gc", "--grace", "0")
    assert result.exit_code == 0, result.output
    assert "warning: grace 0s is short" in result.stderr
    assert f"chunks {unique}: 3 referenced, 0 younger than 0s, 6 deleted" in result.stdout
    assert "stale in-flight markers deleted: 0" in result.stdout
    data = json.loads(run(config, "--json", "gc", "--grace", "0").stdout)
    assert (data["chunks"], data["deleted"], data["in_flight"]) == (3, 0, [])


def test_gc_with_a_save_in_flight_deletes_nothing(config: Path, filled: Filled) -> None:
    inflight = filled.path / "jobs" / JOB_A / "inflight" / "20300101T000000.000Z-abcdef"
    inflight.parent.mkdir(parents=True)
    inflight.write_text(json.dumps({"created": time.time(), "host": "h", "pid": 1}))
    filled.store.delete(JOB_A, filled.a1.checkpoint_id)
    result = run(config, "gc", "--grace", "3600")
    assert result.exit_code == 0, result.output
    assert "saves in flight" in result.stdout and "deleted nothing" in result.stdout


# ---------------------------------------------------------------------------------------------
# global options and errors


def test_store_option_overrides_config(config: Path, filled: Filled, tmp_path: Path) -> None:
    other = open_store(f"file://{tmp_path / 'other'}", chunk_size=CHUNK)
    other.save("other-job", make_src(tmp_path / "src2", "o", b"x" * 100), {"trigger": "manual"})
    result = run(config, "--store", f"file://{tmp_path / 'other'}", "--json", "ls")
    assert result.exit_code == 0, result.output
    assert [j["job_id"] for j in json.loads(result.stdout)] == ["other-job"]
    assert JOB_A in run(config, "ls").stdout  # without --store: the config's store


def test_config_errors(tmp_path: Path) -> None:
    assert_clean_error(run(tmp_path / "missing.toml", "ls"), "missing.toml does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    assert_clean_error(run(bad, "ls"), "unknown settings")
    bad.write_text('store = "ftp://x"\n')
    assert_clean_error(run(bad, "ls"), "unsupported store URL")


def test_config_from_environment(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSHIM_CONFIG", str(config))
    result = CliRunner().invoke(cli, ["ls"])
    assert result.exit_code == 0 and JOB_A in result.stdout


def test_bad_job_ids(config: Path) -> None:
    for args in (["ls", "../x"], ["inspect", "../x"], ["rm", "../x"], ["ls", "a b"]):
        assert_clean_error(run(config, *args), "job id")
    result = run(config, "--json", "ls", "../x")
    assert json.loads(result.stderr)["type"] == "InvalidJobId"


def test_unreachable_s3_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = tmp_path / "s3.toml"
    cfg.write_text(
        'store = "s3://mmshim-test/nowhere"\n'
        'store_options = { endpoint_url = "http://127.0.0.1:1", max_attempts = 1, connect_timeout = 1,'
        " read_timeout = 1 }\n"
    )
    for args in (["ls"], ["inspect", JOB_A], ["gc"], ["rm", JOB_A]):
        assert_clean_error(run(cfg, *args), "cannot reach http://127.0.0.1:1")


# ---------------------------------------------------------------------------------------------
# restore's checkpoint choice and progress meters (no runc needed)


def test_restore_fetches_the_chosen_checkpoint(filled: Filled, tmp_path: Path) -> None:
    info = engine.fetch(filled.store, JOB_A, str(tmp_path / "d1"), filled.a1.checkpoint_id)
    assert isinstance(info, CheckpointInfo) and info.checkpoint_id == filled.a1.checkpoint_id
    assert (tmp_path / "d1" / "rootfs.tar").read_bytes() == b"layer a1"
    latest = engine.fetch(filled.store, JOB_A, str(tmp_path / "d2"))
    assert latest is not None and latest.checkpoint_id == filled.a2.checkpoint_id
    with pytest.raises(CheckpointUnusable, match="no checkpoint"):
        engine.fetch(filled.store, JOB_A, str(tmp_path / "d3"), "20200101T000000.000Z-abcdef")
    with pytest.raises(CheckpointUnusable):  # the damaged one: no fallback when chosen
        engine.fetch(filled.store, JOB_C, str(tmp_path / "d4"), filled.c1.checkpoint_id)
    assert engine.fetch(filled.store, JOB_C, str(tmp_path / "d5")) is None


def chunks_of(filled: Filled, job: str, cid: str) -> set[str]:
    doc = json.loads((filled.path / "jobs" / job / "checkpoints" / f"{cid}.json").read_bytes())
    return {c[0] for f in doc["manifest"]["files"] for c in f["chunks"]}


def test_restore_falls_back_past_a_damaged_checkpoint(filled: Filled, tmp_path: Path) -> None:
    only_a2 = chunks_of(filled, JOB_A, filled.a2.checkpoint_id) - chunks_of(
        filled, JOB_A, filled.a1.checkpoint_id
    )
    sha = sorted(only_a2)[0]
    (filled.path / "chunks" / sha[:2] / sha).write_bytes(b"garbage")
    info = engine.fetch(filled.store, JOB_A, str(tmp_path / "d"))
    assert info is not None and info.checkpoint_id == filled.a1.checkpoint_id
    assert [i.state for i in filled.store.checkpoints(JOB_A)] == ["bad", "good"]


def test_restore_and_checkpoint_meters(
    filled: Filled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meters: list[Meter] = []

    def recording(label: str, total: int | None, enabled: bool) -> Meter:
        assert enabled
        meters.append(Meter(label, total, enabled, io.StringIO()))
        return meters[-1]

    monkeypatch.setattr(cli_mod, "Meter", recording)
    with fetch_meter(filled.store, JOB_A, None, True) as progress:
        info = engine.fetch(filled.store, JOB_A, str(tmp_path / "d"), None, progress)
    assert info is not None
    assert (meters[-1].label, meters[-1].total) == (f"fetching {info.checkpoint_id}", info.size)
    assert meters[-1].done == info.size
    src = make_src(tmp_path / "src3", "s", b"y" * 5000)
    with cli_mod.Meter("uploading", None, True) as progress:
        saved = filled.store.save(JOB_A, src, {"trigger": "manual"}, progress=progress)
    assert (meters[-1].label, meters[-1].total, meters[-1].done) == ("uploading", None, saved.size)
    assert meters[-1].file.getvalue().endswith(f"uploading {cli_mod.human_bytes(saved.size)}\x1b[K\n")


def test_restore_passes_the_choice_and_meter_to_engine(
    config: Path, filled: Filled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meters: list[Meter] = []
    calls: list[tuple[str | None, Any]] = []

    def recording(label: str, total: int | None, enabled: bool) -> Meter:
        meters.append(Meter(label, total, enabled, io.StringIO()))
        return meters[-1]

    def fake_restore(*args: Any) -> CheckpointInfo | None:
        store, job_id, _settings, checkpoint_id, progress = args[5:]
        calls.append((checkpoint_id, progress))
        return engine.fetch(store, job_id, str(tmp_path / f"d{len(calls)}"), checkpoint_id, progress)

    monkeypatch.setattr(cli_mod, "Meter", recording)
    monkeypatch.setattr(cli_mod, "_isatty", lambda _: True)
    monkeypatch.setattr(engine, "restore", fake_restore)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sh"]}}))
    base = ["restore", JOB_A, "--bundle", str(bundle), "--id", "x", "--runc", "/bin/false"]
    result = run(config, *base, "--checkpoint", filled.a1.checkpoint_id)
    assert result.exit_code == 0, result.output
    assert calls[-1][0] == filled.a1.checkpoint_id and calls[-1][1] is not None
    assert (meters[-1].label, meters[-1].total, meters[-1].done) == (
        f"fetching {filled.a1.checkpoint_id}",
        filled.a1.size,
        filled.a1.size,
    )
    result = run(config, *base)
    assert result.exit_code == 0, result.output
    assert calls[-1][0] is None and meters[-1].label == f"fetching {filled.a2.checkpoint_id}"
    assert filled.a2.checkpoint_id in result.stdout
    result = run(config, *base, "--checkpoint", "20200101T000000.000Z-abcdef")
    assert_clean_error(result, "no checkpoint 20200101T000000.000Z-abcdef")


def test_meter_without_total_writes_a_running_count() -> None:
    out = io.StringIO()
    with Meter("uploading", None, True, out) as progress:
        assert progress is not None
        progress(3 * 1024 * 1024)
    assert "uploading 3.0 MiB" in out.getvalue() and out.getvalue().endswith("\n")
    with Meter("uploading", None, False, out) as progress:
        assert progress is None


def test_restore_argument_errors(config: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    result = run(config, "restore", JOB_A, "--bundle", str(bundle), "--id", "x", "--checkpoint", "nope")
    assert_clean_error(result, "invalid checkpoint id")
    assert_clean_error(run(config, "restore", "../x", "--bundle", str(bundle), "--id", "x"), "job id")
    assert_clean_error(
        run(config, "restore", JOB_A, "--bundle", str(bundle), "--id", "x"), "cannot read bundle config"
    )


@pytest.mark.skipif(not shutil.which("runc"), reason="needs runc")
def test_checkpoint_of_unknown_container(config: Path, tmp_path: Path) -> None:
    result = run(config, "checkpoint", "--root", str(tmp_path / "runc"), "no-such-container")
    assert_clean_error(result, "no container 'no-such-container'")


# ---------------------------------------------------------------------------------------------
# serve and imds-emulator


def test_serve_calls_the_viewer(
    config: Path, filled: Filled, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []
    fake = types.ModuleType("mmshim.viewer")
    fake.serve = lambda *args: calls.append(args)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mmshim.viewer", fake)
    result = run(config, "serve", "--port", "9999", "--token", "t0k")
    assert result.exit_code == 0, result.output
    assert calls == [(filled.url, "127.0.0.1", 9999, "t0k", None)]
    result = run(config, "--store", "file:///elsewhere", "serve", "--host", "0.0.0.0")
    assert calls[-1] == ("file:///elsewhere", "0.0.0.0", 8080, None, None)
    prices = tmp_path / "prices.json"
    prices.write_text('{"instances": {}}')
    run(config, "serve", "--prices", str(prices))
    assert calls[-1][-1] == str(prices)
    assert_clean_error(
        run(config, "serve", "--prices", str(tmp_path / "none.json")), "cannot read price table"
    )


def test_imds_emulator_passthrough(config: Path) -> None:
    result = run(config, "imds-emulator", "--help")
    assert result.exit_code == 0
    assert "serve" in result.stdout and "rebalance" in result.stdout
    result = run(config, "imds-emulator", "reset", "--endpoint", "http://127.0.0.1:1")
    assert result.exit_code != 0 and "cannot reach the emulator" in str(result.exception)


# ---------------------------------------------------------------------------------------------
# checkpoint and restore with real runc and CRIU

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
CRIU = "/usr/local/sbin/criu"


def mmshimctl() -> list[str]:
    beside = Path(sys.executable).with_name("mmshimctl")
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-m", "mmshim.cli"]


class Drain:
    """A pipe for a container's stdout/stderr, read to the end by a thread (CRIU takes pipes, but
    neither a regular file nor a named FIFO: both are files outside the container's mounts)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.data = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with open(self.r, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                self.data += chunk

    def close_writer(self) -> None:
        os.close(self.w)

    def text(self, timeout: float = 10) -> str:
        self.thread.join(timeout)
        return self.data.decode(errors="replace")


def make_rootfs(path: Path) -> None:
    for d in ("bin", "tmp", "proc", "sys", "dev", "etc"):
        (path / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", path / "bin" / "busybox")
    for applet in ("sh", "sleep", "echo", "cat"):
        (path / "bin" / applet).symlink_to("busybox")


def make_bundle(path: Path, template: Path) -> Path:
    path.mkdir()
    shutil.copytree(template, path / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=path, check=True)
    spec = json.loads((path / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sh", "-c", COUNTER]
    spec["root"]["readonly"] = False
    (path / "config.json").write_text(json.dumps(spec))
    return path


def read_count(rootfs: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int((rootfs / "tmp" / "count").read_text())
        time.sleep(0.05)
    raise AssertionError(f"no counter in {rootfs}")


def wait_count(rootfs: Path, at_least: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read_count(rootfs)
        if value >= at_least:
            return value
        time.sleep(0.1)
    raise AssertionError(f"counter in {rootfs} stayed below {at_least}")


@pytest.fixture
def runc_env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0 or not os.path.exists(CRIU) or not shutil.which("runc"):
        pytest.skip(f"needs root, runc and {CRIU}")
    if not os.path.exists("/bin/busybox"):
        pytest.skip("needs /bin/busybox (Debian package busybox-static)")
    root = tmp_path / "runc"
    ids = [f"mmshimctl-{uuid.uuid4().hex[:8]}", f"mmshimctl-{uuid.uuid4().hex[:8]}"]
    env = {"root": root, "ids": ids}
    try:
        yield env
    finally:
        for cid in ids:
            subprocess.run(["runc", "--root", str(root), "delete", "-f", cid], capture_output=True)


@pytest.mark.integration
def test_checkpoint_and_restore_with_runc(runc_env: dict[str, Any], tmp_path: Path) -> None:
    root, (first, second) = str(runc_env["root"]), runc_env["ids"]
    store_url = f"file://{tmp_path / 'store'}"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'workdir = "{tmp_path / "work"}"\nstore = "file:///nonexistent/unused"\n')
    env = {**os.environ, "MMSHIM_CONFIG": str(cfg)}
    template = tmp_path / "rootfs-template"
    make_rootfs(template)

    old = make_bundle(tmp_path / "bundle1", template)
    out = Drain()
    run1 = subprocess.run(
        ["runc", "--root", root, "run", "-d", "--bundle", str(old), first],
        stdin=subprocess.DEVNULL, stdout=out.w, stderr=out.w,
    )  # fmt: skip
    out.close_writer()
    assert run1.returncode == 0, out.text()
    before = wait_count(old / "rootfs", 15)
    (old / "rootfs" / "tmp" / "note").write_text("written before the checkpoint\n")

    ckpt = subprocess.run(
        [*mmshimctl(), "--store", store_url, "--json", "checkpoint", "--root", root, first, "--job", "j1"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert ckpt.returncode == 0, ckpt.stderr
    made = json.loads(ckpt.stdout)
    assert made["job_id"] == "j1" and made["size"] > 0 and made["timings"]["paused_s"] > 0
    state = json.loads(subprocess.run(["runc", "--root", root, "state", first], capture_output=True).stdout)
    assert state["status"] == "running"  # --leave-running
    subprocess.run(["runc", "--root", root, "delete", "-f", first], check=True)
    out.text()

    new = make_bundle(tmp_path / "bundle2", template)
    assert not (new / "rootfs" / "tmp" / "note").exists()
    out2, err2 = Drain(), Drain()  # the restored process inherits these (its stdio were pipes)
    restore = subprocess.run(
        [*mmshimctl(), "--store", store_url, "--json", "restore", "j1", "--bundle", str(new),
         "--id", second, "--root", root, "--pid-file", str(tmp_path / "pid")],
        stdin=subprocess.DEVNULL, stdout=out2.w, stderr=err2.w, env=env, timeout=120,
    )  # fmt: skip
    out2.close_writer()
    err2.close_writer()
    try:
        assert restore.returncode == 0
        restored_at = read_count(new / "rootfs")
        assert restored_at >= before  # continued, not restarted from 1
        assert wait_count(new / "rootfs", restored_at + 3) > restored_at  # and still counting
        assert (new / "rootfs" / "tmp" / "note").read_text() == "written before the checkpoint\n"
        state = json.loads(
            subprocess.run(["runc", "--root", root, "state", second], capture_output=True).stdout
        )
        assert state["status"] == "running" and int((tmp_path / "pid").read_text()) == state["pid"]
    finally:
        subprocess.run(["runc", "--root", root, "delete", "-f", second], capture_output=True)
    done = json.loads(out2.text())
    assert done["checkpoint_id"] == made["checkpoint_id"] and done["container_id"] == second, err2.text()

    store = open_store(store_url)
    (info,) = store.checkpoints("j1")
    assert info.meta["trigger"] == "manual" and info.meta["container_id"] == first
    names = [e["event"] for e in store.events("j1")]
    assert names == ["checkpoint.started", "checkpoint.committed", "restore.succeeded"]
