"""engine.restore's fallback loop, with the store and runc faked, and which layer files a checkpoint
may take from the last one (the real thing: tests/integration)."""

import json
import re
from pathlib import Path

import pytest

from mmshim import engine
from mmshim.config import Settings
from mmshim.store import CheckpointInfo, CheckpointUnusable, StoreError, open_store


class FakeStore:
    """Hands out checkpoints newest first; ``marks`` says whether marking one bad is recorded."""

    def __init__(self, ids: list[str], marks: bool) -> None:
        self.ids, self.marks, self.fetched = ids, marks, []

    def fetch_latest(self, job_id, dest, progress=None, defer=None):
        if not self.ids:
            return None
        cid = self.ids[0]
        self.fetched.append(cid)
        Path(dest, "criu").mkdir(parents=True, exist_ok=True)
        return CheckpointInfo(job_id, cid, 0.0, 0, 0, "good", {"args": ["sleep", "1"]})

    def damaged(self, cid: str) -> None:
        if self.marks:
            self.ids.remove(cid)


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[str, dict]:
    spec = {"process": {"args": ["sleep", "1"]}, "root": {"path": "rootfs"}}
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return str(tmp_path), spec


def restore_with_damage(monkeypatch, bundle, store: FakeStore, tmp_path: Path):
    """Every runc restore finds its checkpoint damaged (as the streamer would report it)."""

    def apply_diff(tar: str, rootfs: str) -> None:
        cid = store.fetched[-1]
        store.damaged(cid)
        raise CheckpointUnusable(f"checkpoint {cid}: chunk is corrupt")

    monkeypatch.setattr(engine.layer, "apply_diff", apply_diff)
    monkeypatch.setattr(engine, "undo", lambda *a: None)
    runc = engine.Runc("/bin/false", ["--criu", "/bin/true"], str(tmp_path))
    settings = Settings(workdir=str(tmp_path / "work"), restore_stream=False)
    path, spec = bundle
    return engine.restore(runc, "c1", path, None, spec, store, "job", settings)


def test_damage_falls_back_to_previous_checkpoints_until_none_is_left(monkeypatch, bundle, tmp_path) -> None:
    store = FakeStore(["new", "old"], marks=True)
    assert restore_with_damage(monkeypatch, bundle, store, tmp_path) is None
    assert store.fetched == ["new", "old"]


def test_a_bad_mark_that_cannot_be_written_does_not_loop(monkeypatch, bundle, tmp_path) -> None:
    store = FakeStore(["new", "old"], marks=False)  # the store is read-only: the mark is lost
    with pytest.raises(engine.EngineError, match="failed already"):
        restore_with_damage(monkeypatch, bundle, store, tmp_path)
    assert store.fetched == ["new", "new"]


class RecordingRunc(engine.Runc):
    """A runc that records what it is asked and runs nothing."""

    def __init__(self, global_argv: list[str], root: str) -> None:
        super().__init__("/bin/false", global_argv, root)
        self.calls: list[tuple[str, ...]] = []

    def run(self, *args: str, inherit_stdio: bool = False) -> None:
        self.calls.append(args)

    def state(self, container_id: str) -> dict | None:
        self.calls.append(("state", container_id))
        return None


@pytest.mark.parametrize("criu", ["flag", "path"])
def test_missing_criu_fails_before_any_pause_or_download(monkeypatch, bundle, tmp_path, criu) -> None:
    """Without CRIU a checkpoint fails before it pauses the job and a restore before it fetches:
    the error names what runc would run, and the job's checkpoints are left as they are."""
    if criu == "flag":
        runc, named = RecordingRunc(["--criu", str(tmp_path / "no-criu")], str(tmp_path)), "no-criu"
    else:
        monkeypatch.setenv("PATH", str(tmp_path))  # as if criu were not on dockerd's PATH
        runc, named = RecordingRunc([], str(tmp_path)), f"criu on PATH ({tmp_path})"
    settings = Settings(workdir=str(tmp_path / "work"))
    store = FakeStore(["new", "old"], marks=True)
    path, spec = bundle
    with pytest.raises(engine.EngineError, match=rf"CRIU not found: runc would run .*{re.escape(named)}"):
        engine.restore(runc, "c1", path, None, spec, store, "job", settings)
    assert store.fetched == [] and store.ids == ["new", "old"]
    assert json.loads(Path(path, "config.json").read_text()) == spec
    files = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(engine.EngineError, match="CRIU not found"):
        engine.checkpoint(runc, "c1", files, "job", {}, settings)
    assert runc.calls == [] and not (tmp_path / "work").exists()


FAILING_RUNC = """#!/bin/sh
work=
while [ $# -gt 0 ]; do [ "$1" = --work-path ] && work=$2; shift; done
[ -n "$work" ] && mkdir -p "$work" && printf '%s\\n' '(00.1) Warn (criu/x.c:1): fine' \\
    '(00.2) Error (criu/files-reg.c:2): File /data/x has bad size' >"$work/restore.log"
exit 1
"""


def test_a_failed_restore_says_what_criu_logged(monkeypatch, bundle, tmp_path) -> None:
    """runc names CRIU's log, which goes with the restore's work dir: its errors go in the reason.
    A restore that fails in CRIU is not taken for damage (the cause may be this host): no older
    checkpoint is tried instead."""
    fake = tmp_path / "runc"
    fake.write_text(FAILING_RUNC)
    fake.chmod(0o755)
    monkeypatch.setattr(engine.layer, "apply_diff", lambda tar, rootfs: None)
    runc = engine.Runc(str(fake), ["--criu", "/bin/true"], str(tmp_path))
    settings = Settings(workdir=str(tmp_path / "work"), restore_stream=False)
    store = FakeStore(["new", "old"], marks=True)
    path, spec = bundle
    reason = (
        r"runc restore failed \(1\); CRIU's log: "
        r"\(00.2\) Error \(criu/files-reg.c:2\): File /data/x has bad size$"
    )
    with pytest.raises(engine.EngineError, match=reason):
        engine.restore(runc, "c1", path, None, spec, store, "job", settings)
    assert store.fetched == ["new"]


def test_streamer_errors_are_named_but_not_the_broken_pipes_criu_leaves(tmp_path) -> None:
    error = engine.EngineError("runc restore failed (1)")
    served = [BrokenPipeError(32, "Broken pipe"), StoreError("S3 GET chunks/ab/abc failed")]
    assert str(engine.criu_failed(error, tmp_path / "no.log", served)) == (
        "runc restore failed (1); image not served: StoreError: S3 GET chunks/ab/abc failed"
    )
    assert engine.criu_failed(error, tmp_path / "no.log", served[:1]) is error


@pytest.mark.parametrize(
    ("boot", "layer", "found"),
    [
        ("this-boot", {"align": 4096, "aligned": {"k": [1, 2]}}, True),
        ("another-boot", {"align": 4096, "aligned": {"k": [1, 2]}}, False),  # inodes mean nothing there
        ("this-boot", {"align": 8192, "aligned": {"k": [1, 2]}}, False),  # cut at other offsets
        ("this-boot", {"align": 4096, "aligned": {"k": [3, 2]}}, False),  # past the tar's whole chunks
        ("this-boot", {"align": 4096, "aligned": {"k": [-2, 2]}}, False),
        ("this-boot", {"align": 4096, "aligned": {"k": "garbage"}}, False),
    ],
)
def test_unchanged_files_come_only_from_this_boots_last_checkpoint(
    tmp_path: Path, boot: str, layer: dict, found: bool
) -> None:
    store = open_store(f"file://{tmp_path / 'store'}", chunk_size=4096)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / engine.LAYER_TAR).write_bytes(bytes(range(256)) * 16 * 4 + b"tail")  # 4 chunks, a tail
    store.save("job", stage, {"boot_id": boot, "layer": layer})
    (info,) = store.checkpoints("job")
    whole = store.chunks_of("job", info.checkpoint_id, engine.LAYER_TAR)

    got = engine.unchanged_files(store, "job", "this-boot")

    assert got == ({"k": whole[1:3]} if found else {})
