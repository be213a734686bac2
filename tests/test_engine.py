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
    """Hands out checkpoints newest first; ``marks`` says whether marking one bad is recorded.
    ``cpus`` gives a checkpoint a CPU description (the text of its cpuinfo.img) and ``meta``
    more metadata; ``fetched`` lists the whole fetches, after the CPU description's."""

    def __init__(
        self, ids: list[str], marks: bool, cpus: dict | None = None, meta: dict | None = None
    ) -> None:
        self.ids, self.marks, self.fetched = ids, marks, []
        self.cpus, self.meta = cpus or {}, meta or {}

    def fetch_latest(self, job_id, dest, progress=None, defer=None, skip=()):
        left = [cid for cid in self.ids if cid not in skip]
        return self.fetch(job_id, left[0], dest, progress, defer) if left else None

    def fetch(self, job_id, cid, dest, progress=None, defer=None):
        Path(dest, "criu").mkdir(parents=True, exist_ok=True)
        if cid in self.cpus:
            Path(dest, engine.CPUINFO).write_text(self.cpus[cid])
        if defer is None or not defer("rootfs.tar"):
            self.fetched.append(cid)
        return CheckpointInfo(
            job_id, cid, 0.0, 0, 0, "good", {"args": ["sleep", "1"], **self.meta.get(cid, {})}
        )

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

    def apply_diff(tar: str, rootfs: str, consume: bool) -> None:
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
    assert restore_with_damage(monkeypatch, bundle, store, tmp_path) is None
    assert store.fetched == ["new", "old"]


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
    monkeypatch.setattr(engine.layer, "apply_diff", lambda tar, rootfs, consume: None)
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


CPU_CHECKING_CRIU = """#!/bin/sh
# `criu cpuinfo check`: refuses the images of a CPU with AVX-512, as CRIU does here (no AVX-512)
[ "$1 $2" = "cpuinfo check" ] || exit 0
while [ $# -gt 0 ]; do [ "$1" = --images-dir ] && dir=$2; shift; done
grep -q avx512 "$dir/cpuinfo.img" || exit 0
echo 'Error (criu/arch/x86/cpu.c:274): cpu: CPU xsave size mismatch (2696/832)'  # CRIU's log
exit 1
"""
XSAVE = "CRIU: Error (criu/arch/x86/cpu.c:274): cpu: CPU xsave size mismatch (2696/832)"


class RestoringRunc(engine.Runc):
    """A runc whose restores succeed, recording the CRIU options each was given."""

    def __init__(self, criu: str, root: str) -> None:
        super().__init__("/bin/false", ["--criu", criu], root)
        self.options: list[list[str]] = []

    def run(self, *args: str, inherit_stdio: bool = False) -> None:
        bundle = args[args.index("--bundle") + 1]
        conf = json.loads(Path(bundle, "config.json").read_text())["annotations"][
            engine.CRIU_CONFIG_ANNOTATION
        ]
        self.options.append(Path(conf).read_text().split())


def restore_on_this_cpu(
    monkeypatch,
    bundle,
    tmp_path,
    store: FakeStore,
    checkpoint_id: str | None = None,
    unfit: dict | None = None,
):
    monkeypatch.setattr(engine.layer, "apply_diff", lambda tar, rootfs, consume: None)
    monkeypatch.setattr(engine.platform, "machine", lambda: "x86_64")
    criu = tmp_path / "criu"
    criu.write_text(CPU_CHECKING_CRIU)
    criu.chmod(0o755)
    runc = RestoringRunc(str(criu), str(tmp_path))
    settings = Settings(workdir=str(tmp_path / "work"), restore_stream=False)
    path, spec = bundle
    return runc, engine.restore(
        runc, "c1", path, None, spec, store, "job", settings, checkpoint_id, unfit=unfit
    )


def test_a_checkpoint_this_cpu_cannot_run_is_passed_over_and_kept(monkeypatch, bundle, tmp_path) -> None:
    """The newest checkpoint was taken on a CPU this host's does not match: CRIU's own check of its
    cpuinfo.img refuses it before its bulk is fetched, and the previous one is restored, CRIU
    told to check the CPU again. The newest is not marked bad: a host like its own can use it."""
    store = FakeStore(["new", "old"], marks=True, cpus={"new": "avx512", "old": "avx2"})
    runc, info = restore_on_this_cpu(monkeypatch, bundle, tmp_path, store, unfit=(unfit := {}))
    assert info is not None and info.checkpoint_id == "old"
    assert unfit == {"new": f"this host's CPU cannot run what was checkpointed; {XSAVE}"}
    assert store.fetched == ["old"] and store.ids == ["new", "old"]
    assert runc.options == [["tcp-close", f"cpu-cap={engine.CPU_CAP}"]]


def test_no_checkpoint_this_host_can_run_fails_the_restore_saying_why(monkeypatch, bundle, tmp_path) -> None:
    """Nothing is fetched past the CPU descriptions, and the reason names each checkpoint's."""
    meta = {"old": {"machine": "aarch64", "instance": {"instance-type": "m7g.large"}}}
    store = FakeStore(["new", "old"], marks=True, cpus={"new": "avx512"}, meta=meta)
    with pytest.raises(engine.EngineError) as e:
        restore_on_this_cpu(monkeypatch, bundle, tmp_path, store)
    assert str(e.value) == (
        "no checkpoint of this job can be restored here: "
        f"new: this host's CPU cannot run what was checkpointed; {XSAVE}; "
        "old: taken on aarch64 on a m7g.large, this host is x86_64"
    )
    assert store.fetched == [] and store.ids == ["new", "old"]
    with pytest.raises(engine.EngineError, match=r"^checkpoint new cannot be restored here: this host's CPU"):
        restore_on_this_cpu(monkeypatch, bundle, tmp_path, store, checkpoint_id="new")  # an operator's choice


def docker_made(bundle: tuple[str, dict], container_id: str, config: bytes) -> tuple[str, dict]:
    """The bundle as dockerd makes it: /etc/hostname mounted from the container's directory
    under Docker's data-root, which holds config.v2.json (``config``)."""
    path, spec = bundle
    directory = Path(path) / "data-root" / "containers" / container_id
    directory.mkdir(parents=True)
    (directory / "config.v2.json").write_bytes(config)
    mounts = [{"destination": "/etc/hostname", "source": str(directory / "hostname"), "type": "bind"}]
    return path, {**spec, "mounts": mounts}


@pytest.mark.parametrize(
    ("container_id", "config", "image"),
    [
        ("c1", b'{"Image": "sha256:aa", "Config": {"Image": "busybox"}}', "sha256:aa"),
        ("c2", b'{"Image": "sha256:aa"}', None),  # another container's directory
        ("c1", b'{"Config": {}}', None),
        ("c1", b"not json", None),
        ("c1", b'["Image"]', None),
    ],
)
def test_the_image_id_is_read_from_dockers_config_of_the_container(
    bundle, container_id: str, config: bytes, image: str | None
) -> None:
    _, spec = docker_made(bundle, container_id, config)
    assert engine.image_of(spec, "c1") == image
    assert engine.image_of({"mounts": []}, "c1") is None and engine.image_of({}, "c1") is None


def test_the_spec_is_recorded_without_the_environments_values() -> None:
    spec = {"process": {"args": ["sh"], "env": ["PATH=/bin", "TOKEN=s3cr3t=x", "BARE"]}, "root": {}}
    assert engine.recorded_spec(spec) == {
        "process": {"args": ["sh"], "env": ["PATH", "TOKEN", "BARE"]},
        "root": {},
    }
    assert spec["process"]["env"][1] == "TOKEN=s3cr3t=x"  # the container's own is untouched


def test_a_checkpoint_of_another_image_is_passed_over_and_kept(monkeypatch, bundle, tmp_path) -> None:
    """The tag was pushed again between two attempts: the newest checkpoint was taken on the old
    image and is passed over before its bulk is fetched (left good); one of this image is
    restored; one with no image recorded (or a container not made by Docker) is not checked."""
    meta = {"new": {"image": "sha256:old"}, "mid": {"image": "sha256:this"}}
    made = docker_made(bundle, "c1", b'{"Image": "sha256:this"}')
    store = FakeStore(["new", "mid", "old"], marks=True, meta=meta)
    _, info = restore_on_this_cpu(monkeypatch, made, tmp_path, store, unfit=(unfit := {}))
    assert info is not None and info.checkpoint_id == "mid"
    assert unfit == {"new": "taken on image sha256:old, this container's is sha256:this"}
    assert store.fetched == ["mid"] and store.ids == ["new", "mid", "old"]
    store = FakeStore(["new", "old"], marks=True, meta=meta)
    (tmp_path / "plain").mkdir()
    _, info = restore_on_this_cpu(monkeypatch, bundle, tmp_path / "plain", store)
    assert info is not None and info.checkpoint_id == "new"


def test_a_checkpoint_of_another_command_or_mounts_is_passed_over_unfetched(
    monkeypatch, bundle, tmp_path
) -> None:
    """The bind mount /data is in the new container, /scratch is not (or not as a bind mount)."""
    path, spec = bundle
    spec["mounts"] = [
        {"destination": "/data", "source": str(tmp_path / "data"), "options": ["rbind", "rw"]},
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
    ]
    meta = {"new": {"mounts": ["/data", "/scratch"]}, "old": {"args": ["sleep", "9"]}}
    store = FakeStore(["new", "old"], marks=True, meta=meta)
    with pytest.raises(engine.EngineError) as e:
        restore_on_this_cpu(monkeypatch, (path, spec), tmp_path, store)
    assert str(e.value) == (
        "no checkpoint of this job can be restored here: "
        "new: this container lacks the bind mounts ['/scratch']; "
        "old: its command was ['sleep', '9'], this container runs ['sleep', '1']"
    )
    assert store.fetched == [] and store.ids == ["new", "old"]


def test_a_checkpoint_without_a_cpu_description_is_restored_unchecked(monkeypatch, bundle, tmp_path) -> None:
    """Checkpoints taken before they described their CPU: restored as before, no cpu-cap for CRIU
    (which would then look for the missing image and fail)."""
    runc, info = restore_on_this_cpu(monkeypatch, bundle, tmp_path, FakeStore(["old"], marks=True))
    assert info is not None and runc.options == [["tcp-close"]]


def test_a_cpu_criu_cannot_describe_fails_the_checkpoint_before_the_pause(bundle, tmp_path) -> None:
    criu = tmp_path / "criu"
    criu.write_text("#!/bin/sh\necho 'Error (criu/cpu.c:1): cpuid failed'\nexit 1\n")
    criu.chmod(0o755)
    runc = RecordingRunc(["--criu", str(criu)], str(tmp_path))
    files = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(
        engine.EngineError, match=r"criu cpuinfo dump failed \(1\): Error \(criu/cpu.c:1\): cpuid"
    ):
        engine.checkpoint(runc, "c1", files, "job", {}, Settings(workdir=str(tmp_path / "work")))
    assert runc.calls == [] and not (tmp_path / "work").exists()


def test_no_cpu_description_where_criu_has_none(tmp_path) -> None:
    """CRIU on aarch64 describes no CPU (`cpuinfo dump` returns -ENOTSUP): checkpoints go on
    without one, and their restores are checked by architecture alone."""
    criu = tmp_path / "criu"
    criu.write_text("#!/bin/sh\nexit 161\n")
    criu.chmod(0o755)
    assert engine.cpuinfo_image(str(criu)) is None
