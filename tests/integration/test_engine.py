"""The checkpoint engine on a real container: dedup between checkpoints, caps, TTY containers, a
streamed restore of memory whose chunks recur, big layer files copied after the resume, stored
once however the files before them change, and not read again while unchanged."""

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pycriu.images
import pytest

from mmshim import engine, layer
from mmshim import store as store_mod
from mmshim.config import Settings
from mmshim.localdocker import IMAGE, Docker, build_image, wait_for
from mmshim.store import open_store
from tests.disks import tmpfs, xfs
from tests.test_cli import Drain
from tests.test_store import counting

pytestmark = pytest.mark.integration
MEMHOG_IMAGE = "mmshim-test/memhog:1"
MEMHOG = Path(__file__).resolve().parent.parent / "workloads" / "memhog.c"
STAGED_ARGS = ["/bin/memhog", "8", "random", "50"]


@pytest.fixture(scope="module")
def memhog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("memhog") / "memhog"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(MEMHOG)], check=True)
    return binary


@pytest.fixture(scope="module")
def memhog_image(docker: Docker, memhog: Path) -> str:
    build_image(docker, memhog.parent, MEMHOG_IMAGE, {"/bin/memhog": memhog})
    return MEMHOG_IMAGE


def runc_of(docker: Docker) -> engine.Runc:
    root = docker.runc_root
    return engine.Runc("/usr/sbin/runc", ["--root", root], root)


def test_second_checkpoint_stores_only_what_changed(
    docker: Docker, memhog_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and punches each part of CRIU's staged images out once stored (store release), the
    parts already stored too; the first checkpoint's new random pages stay where CRIU wrote
    them, its page image taken into the file store whole (a pack), which the second names."""
    kept: list[Path] = []  # staging and work dirs, left for the test to look at
    monkeypatch.setattr(engine, "remove_later", lambda *paths: kept.extend(paths))
    cid = docker.out("run", "-d", "--network", "none", memhog_image, "/bin/memhog", "48", "random").strip()
    try:
        docker.wait_logs(cid, "ready")
        store = open_store(f"file://{tmp_path / 'store'}")
        settings = Settings(workdir=str(tmp_path / "work"))
        first = engine.checkpoint(runc_of(docker), cid, store, "dedup", {}, settings)
        docker.run("kill", "-s", "USR1", cid)  # the program rewrites 5% of its memory
        docker.wait_logs(cid, "touched 5%")
        second = engine.checkpoint(runc_of(docker), cid, store, "dedup", {}, settings)
        assert first.stored > 48 << 20  # random memory: all of it stored once
        assert second.stored < first.stored * 0.2
        assert second.meta["frozen_s"] > 0 and second.meta["pages_written"] > 0  # CRIU's own stats
        pages = list((kept[-2] / "criu").glob("pages-*.img"))
        assert pages and sum(p.stat().st_size for p in pages) > 48 << 20
        assert [p.stat().st_blocks for p in pages] == [0] * len(pages)
        assert not list((kept[0] / "criu").glob("pages-*.img"))
        manifests = [store._read_manifest("dedup", c.checkpoint_id)[1] for c in (first, second)]
        places = [{sha: at for f in files for sha, at in f.places.items()} for files in manifests]
        assert len(places[0]) * (4 << 20) > 40 << 20  # most of the 48 MiB
        assert places[0].items() <= places[1].items()
    finally:
        docker.run("rm", "-f", cid, check=False)
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)


def test_nothing_is_written_to_the_store_while_the_container_is_frozen(
    docker: Docker, memhog_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes would slow CRIU while the job is frozen: the upload hashes then, writes after
    (and starts writing back the pages it keeps where CRIU wrote them)."""
    monkeypatch.setattr(store_mod, "POLL_SECONDS", 0.001)  # read CRIU's images as they grow
    cid = docker.out("run", "-d", "--network", "none", memhog_image, "/bin/memhog", "64", "random").strip()
    try:
        docker.wait_logs(cid, "ready")
        runc = runc_of(docker)
        states: list[str] = []

        def hook(point: str, **info: object) -> None:
            # A chunk object written, or a chunk kept in CRIU's page image (a pack) counted.
            key = str(info.get("key", ""))
            if point == "chunk_written" or (point == "tmp_written" and key.startswith("chunks/")):
                states.append((runc.state(cid) or {}).get("status", "gone"))

        monkeypatch.setattr(store_mod, "_fault_hook", hook)
        store = open_store(f"file://{tmp_path / 'store'}")
        info = engine.checkpoint(runc, cid, store, "frozen", {}, Settings(workdir=str(tmp_path / "work")))
        assert info.stored > 64 << 20 and len(states) >= 16
        assert store._read_manifest("frozen", info.checkpoint_id)[0]["format"] == store_mod.FORMAT_PACKED
        assert set(states) == {"running"}, states
    finally:
        docker.run("rm", "-f", cid, check=False)


def test_mount_over_its_cap_refuses_the_checkpoint(docker: Docker, tmp_path: Path) -> None:
    script = "head -c 2000000 /dev/urandom > /dev/shm/big; echo ready; sleep 600"
    # --ipc shareable: /dev/shm is a bind of a host tmpfs, which CRIU does not carry (with Docker's
    # default private IPC it is a tmpfs inside the container, and CRIU dumps it itself).
    cid = docker.out(
        "run", "-d", "--network", "none", "--ipc", "shareable", IMAGE, "sh", "-c", script
    ).strip()
    try:
        docker.wait_logs(cid, "ready")
        store = open_store(f"file://{tmp_path / 'store'}")
        runc = runc_of(docker)
        good = engine.checkpoint(runc, cid, store, "capped", {}, Settings(workdir=str(tmp_path / "w")))
        assert good.meta["mounts"] == ["/dev/shm"]
        with pytest.raises(layer.TooLarge):
            engine.checkpoint(
                runc, cid, store, "capped", {}, Settings(workdir=str(tmp_path / "w"), mount_cap=1 << 20)
            )
        assert [c.checkpoint_id for c in store.checkpoints("capped")] == [good.checkpoint_id]
        assert runc.state(cid)["status"] == "running"  # resumed, not left paused
    finally:
        docker.run("rm", "-f", cid, check=False)


def test_tty_container_is_not_checkpointed_and_says_why(
    docker: Docker, services_env: dict[str, str], s3_server: str
) -> None:
    import tomllib

    with open(services_env["MMSHIM_TEST_CONFIG"], "rb") as f:
        cfg = tomllib.load(f)
    job = f"tty-{uuid.uuid4().hex[:8]}"
    proc = docker.run(
        "run", "--rm", "-t", "--runtime=mmshim", "--network", "none", "-e", f"AWS_BATCH_JOB_ID={job}",
        "-e", "MMSHIM_INTERVAL=1", IMAGE, "sh", "-c", "sleep 2; echo ok",
    )  # fmt: skip
    assert proc.stdout.strip() == "ok"
    store = open_store(cfg["store"], **cfg["store_options"])
    wait_for(lambda: store.events(job), "the watcher to record why (after its start-up delay)", 10, 0.1)
    (event,) = store.events(job)
    assert event["event"] == "protection.skipped" and "TTY" in event["reason"]
    assert store.checkpoints(job) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "2m") as mnt:
        yield mnt


@pytest.mark.parametrize("failure", ["full work dir", "store down"])
def test_failed_checkpoint_leaves_job_running_and_previous_checkpoint(
    docker: Docker, memhog_image: str, tmp_path: Path, small_tmpfs: Path, failure: str
) -> None:
    cid = docker.out("run", "-d", "--network", "none", memhog_image, "/bin/memhog", "8", "random").strip()
    try:
        docker.wait_logs(cid, "ready")
        runc = runc_of(docker)
        store = open_store(f"file://{tmp_path / 'store'}")
        good = engine.checkpoint(runc, cid, store, "fails", {}, Settings(workdir=str(tmp_path / "work")))
        if failure == "full work dir":  # CRIU's 8 MiB of pages do not fit in 2 MiB
            bad_store, settings = store, Settings(workdir=str(small_tmpfs))
        else:
            bad_store = open_store("s3://b/p", endpoint_url="http://127.0.0.1:1", max_attempts=1)
            settings = Settings(workdir=str(tmp_path / "work"))
        with pytest.raises(Exception) as failed:  # which error depends on where it broke
            engine.checkpoint(runc, cid, bad_store, "fails", {}, settings)
        if failure == "full work dir":  # the cause, from CRIU's log (deleted with the work dir)
            assert "CRIU's log: " in str(failed.value) and "No space left on device" in str(failed.value)
        assert runc.state(cid)["status"] == "running"  # resumed, not left paused
        count = docker.out("logs", "--tail", "1", cid)
        time.sleep(0.5)
        assert docker.out("logs", "--tail", "1", cid) != count  # and still counting
        assert [c.checkpoint_id for c in store.checkpoints("fails")] == [good.checkpoint_id]
        assert list(small_tmpfs.iterdir()) == []  # no staging left behind
    finally:
        docker.run("rm", "-f", cid, check=False)


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_disk_at_restore_starts_fresh_and_keeps_the_checkpoint(
    services_env: dict[str, str], memhog: Path, tmp_path: Path, small_tmpfs: Path, stream: bool
) -> None:
    """No room in the work dir for the images of a fetched-first restore: it fails with the
    cause, leaves the new bundle as it was (the plain create follows) and nothing on the disk;
    the checkpoint stays good and restores where there is room. Streamed, the page images never
    touch the disk: the same restore fits in 2 MiB."""
    args = ["/bin/memhog", "8", "random"]
    store = open_store(f"file://{tmp_path / 'store'}")
    settings = Settings(workdir=str(tmp_path / "work"))
    with runc_pair(tmp_path, "full") as (runc, ids, out):
        run_bundle(runc, memhog_bundle(tmp_path / "old", memhog, args), ids[0], out)
        info = engine.checkpoint(runc, ids[0], store, "full", {}, settings)
        at = destroy(runc, ids[0], out)
        new = memhog_bundle(tmp_path / "new", memhog, args)
        small = Settings(workdir=str(small_tmpfs), restore_stream=stream)
        if stream:
            assert restore_into(runc, ids[1], new, store, "full", small, out) is not None
            continues_from(out, at)
            return

        before = contents(new)
        with pytest.raises(store_mod.StoreError, match="No space left on device"):
            restore_into(runc, ids[1], new, store, "full", small, out)
        assert contents(new) == before
        assert list(small_tmpfs.iterdir()) == []
        assert [(c.checkpoint_id, c.state) for c in store.checkpoints("full")] == [
            (info.checkpoint_id, "good")
        ]
        assert restore_into(runc, ids[1], new, store, "full", settings, out) is not None
        continues_from(out, at)


def test_a_restore_needs_room_for_the_layer_once_not_twice(
    services_env: dict[str, str], memhog: Path, tmp_path: Path
) -> None:
    """A job with 32 MiB of staged input in its layer is retried on a host whose disk (work dir
    and container rootfs alike) has 56 MiB: the fetched layer archive (the input, and the store's
    alignment) and the input laid on from it would need over 70; consumed as it is laid on, the
    archive leaves room, and the job resumes with its input."""
    store = open_store(f"file://{tmp_path / 'store'}")
    old, staged = staged_bundle(tmp_path, memhog, "data/inputs.bin", 32 << 20)
    with runc_pair(tmp_path, "room") as (runc, ids, out), tmpfs(tmp_path / "disk", "56m") as disk:
        run_bundle(runc, old, ids[0], out)
        engine.checkpoint(runc, ids[0], store, "room", {}, Settings(workdir=str(tmp_path / "work")))
        new = memhog_bundle(disk / "new", memhog, STAGED_ARGS)
        settings = Settings(workdir=str(disk / "work"), restore_stream=True)
        rootfs = restore_elsewhere(runc, ids, out, new, store, "room", settings)
        assert (rootfs / "data" / "inputs.bin").read_bytes() == staged.read_bytes()


def contents(bundle: Path) -> list[tuple[Path, bytes | None]]:
    """Every path under a bundle with a file's bytes: what a failed restore must leave as it was."""
    return [(p, p.read_bytes() if p.is_file() else None) for p in sorted(bundle.rglob("*"))]


def counts(out: Drain) -> list[int]:
    """The counts memhog has printed into ``out`` so far (whole lines only)."""
    lines = out.data.decode(errors="replace").split("\n")[:-1]
    return [int(line.split()[1]) for line in lines if line.startswith("count ")]


def staged_bundle(tmp_path: Path, memhog: Path, rel: str, size: int) -> tuple[Path, Path]:
    """memhog's bundle (STAGED_ARGS) at tmp_path/old with ``size`` random bytes at ``rel`` in its
    rootfs, as a job's staged input; (bundle, input)."""
    old = memhog_bundle(tmp_path / "old", memhog, STAGED_ARGS)
    staged = old / "rootfs" / rel
    staged.parent.mkdir()
    staged.write_bytes(os.urandom(size))
    return old, staged


def memhog_bundle(path: Path, memhog: Path, args: list[str], env: tuple[str, ...] = ()) -> Path:
    (path / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(memhog, path / "rootfs" / "bin" / "memhog")
    subprocess.run(["runc", "spec"], cwd=path, check=True)
    spec = json.loads((path / "config.json").read_text())
    spec["process"].update(terminal=False, args=args, env=[*spec["process"]["env"], *env])
    spec["root"]["readonly"] = False
    (path / "config.json").write_text(json.dumps(spec))
    return path


@contextlib.contextmanager
def runc_pair(tmp_path: Path, prefix: str) -> Iterator[tuple[engine.Runc, list[str], Drain]]:
    """A private runc root, ids for an original container and its restored successor, and the
    output of both; whatever is left of them is deleted at the end."""
    root, ids = tmp_path / "runc", [f"{prefix}-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    runc = engine.Runc("/usr/sbin/runc", ["--root", str(root)], str(root))
    out = Drain()
    try:
        yield runc, ids, out
    finally:
        for cid in ids:
            subprocess.run([runc.runc, *runc.global_argv, "delete", "-f", cid], capture_output=True)
        out.close_writer()


def run_bundle(runc: engine.Runc, bundle: Path, cid: str, out: Drain) -> None:
    """Start memhog's bundle under plain runc, its output into ``out``, and wait for its counting."""
    subprocess.run([runc.runc, *runc.global_argv, "run", "-d", "--bundle", str(bundle), cid],
                   stdin=subprocess.DEVNULL, stdout=out.w, stderr=out.w, check=True)  # fmt: skip
    wait_for(lambda: len(counts(out)) >= 3, "memhog counting")


def destroy(runc: engine.Runc, cid: str, out: Drain) -> int:
    """Delete the original container; the last count it printed."""
    subprocess.run([runc.runc, *runc.global_argv, "delete", "-f", cid], check=True)
    return counts(out)[-1]


def restore_into(
    runc: engine.Runc,
    cid: str,
    bundle: Path,
    store: store_mod.Store,
    job: str,
    settings: Settings,
    out: Drain,
    checkpoint_id: str | None = None,
) -> store_mod.CheckpointInfo | None:
    """engine.restore into a new bundle; the restored job's stdio goes into ``out``."""
    saved = [os.dup(1), os.dup(2)]
    os.dup2(out.w, 1), os.dup2(out.w, 2)  # runc restore hands its stdio to the restored job
    try:
        spec = json.loads((bundle / "config.json").read_text())
        return engine.restore(runc, cid, str(bundle), None, spec, store, job, settings, checkpoint_id)
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])


def restore_elsewhere(
    runc: engine.Runc,
    ids: list[str],
    out: Drain,
    bundle: Path,
    store: store_mod.Store,
    job: str,
    settings: Settings,
) -> Path:
    """Delete the original container, restore the job into ``bundle`` (a new one of the same
    command) and see memhog count on from where it was; the new rootfs."""
    at = destroy(runc, ids[0], out)
    assert restore_into(runc, ids[1], bundle, store, job, settings, out) is not None
    continues_from(out, at)
    return bundle / "rootfs"


def continues_from(out: Drain, at: int) -> None:
    """The restored memhog counts on from where its checkpoint was taken."""
    wait_for(lambda: counts(out)[-1] > at + 2, "the restored memhog counting")
    assert min(c for c in counts(out) if c > at) in range(at + 1, at + 4)


def locked(path: Path) -> bool:
    """Whether another process holds a flock on ``path`` (this one cannot take it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_file_lock_is_held_again_after_the_restore(
    services_env: dict[str, str], memhog: Path, tmp_path: Path
) -> None:
    """A job's flock on a file of its rootfs is dumped (runc's --file-locks) and the restored job
    holds it again in its new rootfs: no other process can take it there."""
    args, env = ["/bin/memhog", "8", "text"], ("MEMHOG_LOCK=/job.lock",)
    store = open_store(f"file://{tmp_path / 'store'}")
    settings = Settings(workdir=str(tmp_path / "work"))
    with runc_pair(tmp_path, "lock") as (runc, ids, out):
        old = memhog_bundle(tmp_path / "old", memhog, args, env)
        run_bundle(runc, old, ids[0], out)
        assert locked(old / "rootfs" / "job.lock")
        engine.checkpoint(runc, ids[0], store, "lock", {}, settings)
        new = memhog_bundle(tmp_path / "new", memhog, args, env)
        rootfs = restore_elsewhere(runc, ids, out, new, store, "lock", settings)
        assert not locked(old / "rootfs" / "job.lock")  # its holder is gone with the original
        assert locked(rootfs / "job.lock")


def from_another_cpu(
    store: store_mod.Store, job: str, info: store_mod.CheckpointInfo, tmp_path: Path
) -> store_mod.CheckpointInfo:
    """The checkpoint saved again as the job's newest, as if taken on a CPU whose xsave frame is
    bigger than this host's (one with AVX-512, say): only its cpuinfo.img differs."""
    copy = tmp_path / f"another-cpu-{info.checkpoint_id}"
    store.fetch(job, info.checkpoint_id, copy)
    image = copy / engine.CPUINFO
    with open(image, "rb") as f:
        doc = pycriu.images.load(f)
    cpu = doc["entries"][0]["x86_entry"][0]
    cpu["xsave_size"] += 64
    cpu["xsave_size_max"] += 64
    with open(image, "wb") as f:
        pycriu.images.dump(doc, f)
    return store.save(job, copy, info.meta)


@pytest.mark.parametrize("stream", [True, False])
def test_a_checkpoint_from_another_cpu_is_not_restored(
    services_env: dict[str, str], memhog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """A checkpoint describes its host's CPU (runc asks CRIU for no description, mmshim adds it).
    On restore, one this host's CPU cannot run is passed over before its bulk is fetched and the
    previous one is restored; it stays good. Were that check skipped, CRIU refuses it itself
    (cpu-cap in its configuration) and the new bundle is left as it was."""
    args = ["/bin/memhog", "8", "random"]
    store = open_store(f"file://{tmp_path / 'store'}")
    settings = Settings(workdir=str(tmp_path / "work"), restore_stream=stream)
    with runc_pair(tmp_path, "cpu") as (runc, ids, out):
        run_bundle(runc, memhog_bundle(tmp_path / "old", memhog, args), ids[0], out)
        info = engine.checkpoint(runc, ids[0], store, "cpu", {}, settings)
        assert info.meta["machine"] == platform.machine()
        foreign = from_another_cpu(store, "cpu", info, tmp_path)
        at = destroy(runc, ids[0], out)
        new = memhog_bundle(tmp_path / "new", memhog, args)
        before = contents(new)
        with monkeypatch.context() as m:
            m.setattr(engine, "cpu_misfit", lambda *a: None)
            with pytest.raises(engine.EngineError, match=r"CRIU's log: .*CPU xsave size mismatch"):
                restore_into(runc, ids[1], new, store, "cpu", settings, out, foreign.checkpoint_id)
        assert contents(new) == before
        restored = restore_into(runc, ids[1], new, store, "cpu", settings, out)
        assert restored is not None and restored.checkpoint_id == info.checkpoint_id
        continues_from(out, at)
        assert [(c.checkpoint_id, c.state) for c in store.checkpoints("cpu")] == [
            (foreign.checkpoint_id, "good"),
            (info.checkpoint_id, "good"),
        ]


def test_streamed_restore_decodes_recurring_memory_once(
    services_env: dict[str, str], memhog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text memory repeats its chunks: a streamed restore on real runc/CRIU fetches, verifies
    and decodes each once (_Spill), and the job continues where it was."""
    args = ["/bin/memhog", "24", "text", "50"]
    store = open_store(f"file://{tmp_path / 'store'}", chunk_size=64 << 10)
    settings = Settings(workdir=str(tmp_path / "work"))
    with runc_pair(tmp_path, "spill") as (runc, ids, out):
        run_bundle(runc, memhog_bundle(tmp_path / "old", memhog, args), ids[0], out)
        info = engine.checkpoint(runc, ids[0], store, "spill", {}, settings)
        at = destroy(runc, ids[0], out)
        files = store._read_manifest("spill", info.checkpoint_id)[1]
        (pages,) = [f for f in files if "pages-" in f.name]
        shas = [sha for sha, raw, stored in pages.chunks if stored < raw]  # compressed: decoded
        assert len(shas) > 2 * len(set(shas))  # text recurs
        only_pages = set(shas) - {sha for f in files if f is not pages for sha, _, _ in f.chunks}

        decoded = counting(monkeypatch, "_decoded")
        new = memhog_bundle(tmp_path / "new", memhog, args)
        restored = restore_into(runc, ids[1], new, store, "spill", settings, out)
        assert restored is not None and restored.deferred  # streamed
        assert sorted(d for d in decoded if d in only_pages) == sorted(only_pages)  # once each
        continues_from(out, at)


def restores_with_input(
    runc: engine.Runc,
    ids: list[str],
    out: Drain,
    tmp_path: Path,
    memhog: Path,
    store: store_mod.Store,
    job: str,
    staged: Path,
) -> None:
    """restore_elsewhere into a new bundle (and work dir) under tmp_path: the job counts on, and
    its staged input (staged_bundle's, at data/inputs.bin) is as it was."""
    want = staged.read_bytes()
    new = memhog_bundle(tmp_path / "new", memhog, STAGED_ARGS)
    rootfs = restore_elsewhere(runc, ids, out, new, store, job, Settings(workdir=str(tmp_path / "work")))
    assert (rootfs / "data" / "inputs.bin").read_bytes() == want


def test_a_frozen_copy_shares_blocks_on_xfs_with_reflink(
    services_env: dict[str, str], memhog: Path, tmp_path: Path
) -> None:
    """A Spot-notice checkpoint copies the layer while the container is frozen. On XFS with
    reflink (a host's root file system, say, with Docker's layers and the work dir on it),
    the copy shares the input's blocks: a job with 160 MiB of staged input on a 300 MiB disk
    is checkpointed (two copies would not fit), and the restore has the input as it was."""
    store = open_store(f"file://{tmp_path / 'store'}")
    with xfs(tmp_path / "disk") as disk, runc_pair(tmp_path, "xfs") as (runc, ids, out):
        old, staged = staged_bundle(disk, memhog, "data/inputs.bin", 160 << 20)
        run_bundle(runc, old, ids[0], out)
        settings = Settings(workdir=str(disk / "work"))
        info = engine.checkpoint(runc, ids[0], store, "xfs", {}, settings, urgent=True)
        assert info.meta["layer"]["copied_later"] == 0  # all of it copied frozen
        restores_with_input(runc, ids, out, tmp_path, memhog, store, "xfs", staged)


def test_big_unchanged_files_are_read_after_the_resume_never_copied(
    services_env: dict[str, str], memhog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interval checkpoint pins big files the job left alone and the upload reads them once
    it runs again, straight into the store: the first checkpoint of a job with 32 MiB of staged
    input fits a 24 MiB work dir (CRIU's images and the rest of the layer do), the restore gets
    the input as it was."""
    monkeypatch.setattr(engine, "LAYER_COLD_SECONDS", 0.0)  # every big file counts as left alone
    store = open_store(f"file://{tmp_path / 'store'}")
    old, staged = staged_bundle(tmp_path, memhog, "data/inputs.bin", 32 << 20)
    with runc_pair(tmp_path, "late") as (runc, ids, out), tmpfs(tmp_path / "disk", "24m") as disk:
        settings = Settings(workdir=str(disk / "work"))
        run_bundle(runc, old, ids[0], out)
        info = engine.checkpoint(runc, ids[0], store, "late", {}, settings)
        assert info.meta["layer"]["copied_later"] >= staged.stat().st_size and "retried" not in info.meta
        restores_with_input(runc, ids, out, tmp_path, memhog, store, "late", staged)


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_a_pinned_file_written_before_the_upload_reads_it_is_copied_frozen_at_once(
    services_env: dict[str, str], memhog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The job writes to a file it had left alone, after the resume and before the upload read
    it (a log written every few minutes): that attempt fails, the checkpoint is taken again at
    once with the file copied while frozen, and commits, saying why. The job runs on and the
    restore has the file as the second freeze saw it. A file cut short fails the upload's read
    first; the change is still found to be why."""
    monkeypatch.setattr(engine, "LAYER_COLD_SECONDS", 0.0)  # every big file counts as left alone
    store = open_store(f"file://{tmp_path / 'store'}")
    settings = Settings(workdir=str(tmp_path / "work"))
    old, staged = staged_bundle(tmp_path, memhog, "data/inputs.bin", 4 << 20)
    with runc_pair(tmp_path, "retry") as (runc, ids, out):
        run_bundle(runc, old, ids[0], out)
        publish, attempts = layer.Capture.publish, []

        def job_writes_first(self: layer.Capture) -> dict:
            attempts.append(self.extents)
            if len(attempts) == 1:  # the job, running again, before the upload reads the file
                with open(staged, "ab") as f:
                    if change == "append":
                        f.write(b"appended after the resume")
                    else:
                        f.truncate(1 << 20)
            return publish(self)

        monkeypatch.setattr(layer.Capture, "publish", job_writes_first)
        info = engine.checkpoint(runc, ids[0], store, "retry", {}, settings)

        assert "inputs.bin' changed after the container was resumed" in info.meta["retried"]
        pinned = [[count for *_, count in extents] for extents in attempts]  # memhog's binary too
        assert len(pinned) == 2 and 4 << 20 in pinned[0] and 4 << 20 not in pinned[1]  # then copied frozen
        assert [c.checkpoint_id for c in store.checkpoints("retry")] == [info.checkpoint_id]
        assert runc.state(ids[0])["status"] == "running"
        restores_with_input(runc, ids, out, tmp_path, memhog, store, "retry", staged)


def test_a_growing_log_before_a_staged_input_does_not_store_the_input_again(
    services_env: dict[str, str], memhog: Path, tmp_path: Path
) -> None:
    """A Nextflow task's work dir: `.command.log` (sorted before the inputs in the tar) grows
    between checkpoints. The staged input behind it starts at a chunk boundary of the tar both
    times, so the second checkpoint stores the chunk with the log, not the input again; the
    restore has both as they were."""
    store = open_store(f"file://{tmp_path / 'store'}")
    settings = Settings(workdir=str(tmp_path / "work"))
    old, reads = staged_bundle(tmp_path, memhog, "nxf-work/reads.fastq", 2 * store.chunk_size + 12345)
    work = reads.parent
    (work / ".command.log").write_bytes(b"started\n")
    with runc_pair(tmp_path, "nxf") as (runc, ids, out):
        run_bundle(runc, old, ids[0], out)
        first = engine.checkpoint(runc, ids[0], store, "nxf", {}, settings)
        with open(work / ".command.log", "ab") as f:
            f.write(b"progress\n" * 100)  # past a 512-byte tar block
        second = engine.checkpoint(runc, ids[0], store, "nxf", {}, settings)

        before, after = (
            {sha: raw for sha, raw, _ in store.chunks_of("nxf", info.checkpoint_id, "rootfs.tar")}
            for info in (first, second)
        )
        assert sum(raw for sha, raw in after.items() if sha not in before) <= store.chunk_size  # the log's
        want = {p.name: p.read_bytes() for p in work.iterdir()}
        new = memhog_bundle(tmp_path / "new", memhog, STAGED_ARGS)
        rootfs = restore_elsewhere(runc, ids, out, new, store, "nxf", settings)
        assert {p.name: p.read_bytes() for p in (rootfs / "nxf-work").iterdir()} == want


def test_a_staged_input_unchanged_since_the_last_checkpoint_is_not_read_again(
    services_env: dict[str, str], memhog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input the job left alone since the last checkpoint on this boot: the next checkpoint
    (here one at a Spot notice) names the last one's chunks for it and reads none of it; a change
    ends that. The restore has the input as it was at each checkpoint."""
    monkeypatch.setattr(engine, "LAYER_COLD_SECONDS", 0.0)  # every file counts as left alone
    store = open_store(f"file://{tmp_path / 'store'}")
    settings = Settings(workdir=str(tmp_path / "work"))
    old, reads = staged_bundle(tmp_path, memhog, "nxf-work/reads.fastq", 2 * store.chunk_size + 12345)
    with runc_pair(tmp_path, "reuse") as (runc, ids, out):
        run_bundle(runc, old, ids[0], out)
        first = engine.checkpoint(runc, ids[0], store, "reuse", {}, settings)
        second = engine.checkpoint(runc, ids[0], store, "reuse", {}, settings, urgent=True)
        assert first.meta["layer"]["reused"] == 0 and second.meta["layer"]["reused"] == 2 * store.chunk_size
        fetched = tmp_path / "fetched"
        store.fetch("reuse", second.checkpoint_id, fetched)
        with tarfile.open(fetched / "rootfs.tar") as tf:
            assert tf.extractfile("nxf-work/reads.fastq").read() == reads.read_bytes()
        with open(reads, "r+b") as f:  # the job rewrites part of it
            f.write(b"rewritten")
        third = engine.checkpoint(runc, ids[0], store, "reuse", {}, settings)
        assert third.meta["layer"]["reused"] == 0
        want = reads.read_bytes()
        new = memhog_bundle(tmp_path / "new", memhog, STAGED_ARGS)
        rootfs = restore_elsewhere(runc, ids, out, new, store, "reuse", settings)
        assert (rootfs / "nxf-work" / "reads.fastq").read_bytes() == want
