"""Checkpoint and restore of a large container: mmshim's engine against raw runc/CRIU, same run.

A static test program holds BENCH_MIB MiB (default 2048) of incompressible or compressible memory
in a container of a private dockerd. Measured, for each kind of memory:
- time to a committed checkpoint in file:// and in S3 (moto's server on loopback) against
  `runc checkpoint --leave-running` to a local directory, and for file:// also against that
  checkpoint followed by a `sync` (the store's chunks are on disk when it commits; raw's are not),
  and for S3 against that checkpoint followed by boto3's own `upload_file` of its images;
- time the container is frozen (paused) against runc's (CRIU's frozen time);
- both for a checkpoint on the interval (chunks written once the container runs again) and for
  one at a Spot notice (urgent: chunks written while CRIU dumps, to commit sooner);
- bytes stored by a second checkpoint after the program rewrote 5% of its memory;
- restore: a `docker run` that restores on create from the file:// store, with the page images
  streamed into CRIU as they are read and verified, and with everything fetched first; against
  a plain `runc restore -d` from a local directory of the same program with the container's own
  spec in a runc bundle (no dockerd), alternating with them (the `runc restore` inside the
  fetched-first restore is shown too: it runs right after the fetch wrote the images);
- a small container (64 MiB) with BENCH_LAYER_MIB MiB (default 1024) of staged input in its
  writable layer, untouched for longer than engine.LAYER_COLD_SECONDS: the freeze of an interval
  checkpoint (the input read into the store after the resume) and of one at a Spot notice (copied
  frozen), against CRIU's frozen time of a raw `runc checkpoint` (which does not carry the layer at all);
  then of the next checkpoint of each kind, the input unchanged (not read: the last one's chunks
  are named); and the time of each to a committed checkpoint against the raw `runc checkpoint`.
Raw and mmshim checkpoints alternate, BENCH_REPS times each (default 3, medians shown; S3 once).
Every timed run, checkpoint or restore, ours or raw, starts after a `sync` (one's dirty pages do
not slow the next one's writes) and with warm memory (WARM, BENCH_WARM_MIB). Prints a table
of ratios: of the medians, and the median of each round's own ratio ("paired": on this noisy VM
a slow spell then weighs on both sides alike). Needs root and the host set-up
(install/setup-host.sh).
"""

import json
import mmap
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import boto3
from common import bench_host

from mmshim import engine
from mmshim.config import Settings
from mmshim.localdocker import Docker
from mmshim.store import Store, open_store
from tests.services import start_s3, stop_pidfile

MIB = int(os.environ.get("BENCH_MIB", "2048"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
LAYER_MIB = int(os.environ.get("BENCH_LAYER_MIB", "1024"))
IMAGE = "mmshim-bench/memhog:1"
RUNC = shutil.which("runc") or "/usr/sbin/runc"
# WARM: every timed run, ours and the baseline alike, starts right after this process touched and
# freed WARM_MIB MiB of memory. On this kind of VM (Firecracker, `page_reporting.page_reporting_order=11`
# on the kernel command line) memory left free for about 2 s is handed back to the host, and the
# next use of it page-faults in the host: whatever a run allocates first (CRIU's images in the
# page cache, a restored process's memory) then costs up to several times its price on a host
# without that. A raw `runc checkpoint` of 2 GiB to local disk took 1.57 to 6.2 s in one run
# without it, 0.99 to 1.28 s (6 rounds) with 6 GiB warmed before each.
WARM_MIB = int(os.environ.get("BENCH_WARM_MIB", str(2 * MIB + 1024)))


def criu_frozen(work: Path) -> float:
    import pycriu.images

    with open(work / "stats-dump", "rb") as f:
        return pycriu.images.load(f)["entries"][0]["dump"]["frozen_time"] / 1e6


def raw_checkpoint(runc: engine.Runc, cid: str, images: Path, work: Path) -> None:
    runc.run("checkpoint", "--leave-running", "--image-path", str(images), "--work-path", str(work), cid)


def settle() -> None:
    """Let the previous checkpoint's staging removal (engine.remove_later) and its dirty pages
    finish, so that they do not slow the next measurement, and warm the memory it will take."""
    for t in threading.enumerate():
        if t.name == "remove-staging":
            t.join()
    os.sync()
    warm = bytearray(WARM_MIB << 20)
    warm[:: mmap.PAGESIZE] = b"\1" * len(range(0, len(warm), mmap.PAGESIZE))
    del warm


def plain_upload(s3: str, images: Path, prefix: str) -> float:
    """Seconds that boto3's own upload_file (s3transfer, default settings) takes for the images."""
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    t0 = time.monotonic()
    for f in sorted(images.iterdir()):
        client.upload_file(str(f), "bench", f"{prefix}/{f.name}")
    return time.monotonic() - t0


def one_kind(d: Docker, state: Path, kind: str, s3: str) -> dict[str, list[float]]:
    args = ["/bin/memhog", str(MIB), kind]
    job = f"bench-{kind}"
    cid = d.out("run", "-d", "--runtime=runc", "--network", "none", IMAGE, *args).strip()
    try:
        d.wait_logs(cid, "ready")
        root = d.runc_root
        runc = engine.Runc(RUNC, ["--root", root], root)
        settings = Settings(workdir=str(state / "work"))
        file_store = open_store(f"file://{state / 'store'}")
        s3_store = open_store("s3://bench/mmshim", endpoint_url=s3, region="us-east-1")
        runs: dict[str, list[float]] = {}

        def add(key: str, value: float) -> None:
            runs.setdefault(key, []).append(value)

        def ours(name: str, store: Store, urgent: bool = False) -> None:
            if store is file_store:  # an empty store each time: every run writes every chunk
                file_store.delete(job)
                file_store.gc(grace_seconds=0)
            settle()
            t0 = time.monotonic()
            info = engine.checkpoint(runc, cid, store, job, {"progress_s": 0.0}, settings, urgent=urgent)
            add(f"{name}_checkpoint", time.monotonic() - t0)
            add(f"{name}_paused", info.meta["timings"]["paused_s"])
            add(f"{name}_frozen", info.meta.get("frozen_s", float("nan")))
            add(f"{name}_stored", info.stored)

        for rep in range(REPS):
            raw_dir, raw_work = state / f"raw-{kind}", state / f"raw-{kind}-work"
            settle()
            t0 = time.monotonic()
            raw_checkpoint(runc, cid, raw_dir, raw_work)
            add("raw_checkpoint", time.monotonic() - t0)
            os.sync()  # what mmshim's store does for its copy: on disk before it is committed
            add("raw_durable", time.monotonic() - t0)
            add("raw_frozen", criu_frozen(raw_work))
            add("raw_bytes", sum(f.stat().st_size for f in raw_dir.iterdir()))
            if rep == 0:  # S3 is measured once: against raw's images sent by plain boto3
                add("raw_s3", runs["raw_checkpoint"][-1] + plain_upload(s3, raw_dir, f"plain/{kind}"))
            shutil.rmtree(raw_dir)
            shutil.rmtree(raw_work)
            for name in ("file", "urgent")[:: 1 if rep % 2 else -1]:
                ours(name, file_store, urgent=name == "urgent")
        ours("s3", s3_store)
        r = {k: list(v) for k, v in runs.items()}
        ours("file", file_store)  # the base of the second checkpoint below (not a measurement)
        d.run("kill", "-s", "USR1", cid)
        d.wait_logs(cid, "touched 5%")
        info = engine.checkpoint(runc, cid, file_store, job, {"progress_s": 0.0}, settings)
        r["second_stored"] = [info.stored]
        with open(Path(runc.state(cid)["bundle"]) / "config.json") as f:
            spec = json.load(f)
        r.update(restore(d, state, args, job, kind, spec))
    finally:
        d.run("rm", "-f", cid, check=False)
    return r


class RawContainer:
    """The same program under plain runc (no dockerd, no mmshim), for the baseline `runc restore`
    from a local directory: the docker container's own OCI spec (namespaces, mounts, cgroup
    limits) with a plain directory as rootfs. Its stdout is a pipe (CRIU carries it as external)."""

    def __init__(self, state: Path, kind: str, spec: dict) -> None:
        self.bundle, self.root, self.cid = state / f"bundle-{kind}", state / "raw-runc", f"raw-{kind}"
        self.images, self.ready = state / f"raw-images-{kind}", threading.Event()
        (self.bundle / "rootfs" / "bin").mkdir(parents=True)
        shutil.copy(state / "memhog", self.bundle / "rootfs" / "bin" / "memhog")
        spec = {k: v for k, v in spec.items() if k != "hooks"}  # dockerd's, for its own containers
        spec["root"] = {"path": str(self.bundle / "rootfs"), "readonly": False}
        spec["linux"] = {**spec["linux"], "cgroupsPath": f"/mmshim-bench/{self.cid}"}
        (self.bundle / "config.json").write_text(json.dumps(spec))
        self._runc("run", "-d", "--bundle", str(self.bundle), self.cid)
        if not self.ready.wait(120):
            raise RuntimeError("the raw container did not get ready")
        self._runc("checkpoint", "--leave-running", "--image-path", str(self.images),
                   "--work-path", f"{self.images}-w", self.cid)  # fmt: skip

    def _runc(self, *args: str) -> None:
        r, w = os.pipe()  # the container's stdout: drained, so that it never blocks
        threading.Thread(target=self._drain, args=(r,), daemon=True).start()
        try:
            subprocess.run([RUNC, "--root", str(self.root), *args], stdin=subprocess.DEVNULL,
                           stdout=w, stderr=w, check=True)  # fmt: skip
        finally:
            os.close(w)

    def _drain(self, fd: int) -> None:
        while data := os.read(fd, 65536):
            if b"ready" in data:
                self.ready.set()
        os.close(fd)

    def restore(self) -> float:
        """Time `runc restore -d` from the images taken at the start, the container deleted, then
        settle()."""
        self.delete(check=False)
        settle()
        t0 = time.monotonic()
        self._runc("restore", "-d", "--image-path", str(self.images), "--work-path", f"{self.images}-r",
                   "--bundle", str(self.bundle), self.cid)  # fmt: skip
        return time.monotonic() - t0

    def engine_restore(self, store: Store, job: str, settings: Settings) -> float:
        """Time mmshim's engine.restore (what the runtime's create runs) into this bundle, the
        running container deleted (a retry gets a new one), then settle()."""
        runc = engine.Runc(RUNC, ["--root", str(self.root)], str(self.root))
        spec = json.loads((self.bundle / "config.json").read_text())
        self.delete(check=False)
        settle()
        r, w = os.pipe()  # runc restore passes its stdout on to the restored program
        threading.Thread(target=self._drain, args=(r,), daemon=True).start()
        saved = os.dup(1)
        os.dup2(w, 1)
        os.close(w)
        try:
            t0 = time.monotonic()
            info = engine.restore(runc, self.cid, str(self.bundle), None, spec, store, job, settings)
            elapsed = time.monotonic() - t0
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        if info is None or bool(info.deferred) != settings.restore_stream:
            raise RuntimeError("engine.restore did not restore as asked")
        return elapsed

    def delete(self, check: bool = True) -> None:
        """`runc delete -f`; check=False also when there is no container (deleted already)."""
        argv = [RUNC, "--root", str(self.root), "delete", "-f", self.cid]
        subprocess.run(argv, capture_output=True, check=check)

    def close(self) -> None:
        self.delete(check=False)


FIELDS = {  # restore bench rows <- restore.succeeded fields, fetched first ("0") and streamed ("1")
    "0": [("inner_restore", "runc_restore_s"), ("fetched_restore", "duration_s"), ("fetch", "fetch_s")],
    "1": [
        ("mmshim_restore", "duration_s"),
        ("before_runc", "fetch_s"),
        ("streamed_runc", "runc_restore_s"),
    ],
}


def restore(
    d: Docker, state: Path, args: list[str], job: str, kind: str, spec: dict
) -> dict[str, list[float]]:
    """Restores, BENCH_REPS rounds (each list in round order). The baseline: a plain `runc
    restore -d` from a local directory after a sync (RawContainer). Against it, in the same runc
    container, mmshim's engine.restore from the file:// store, streamed (page images go into CRIU
    while they are read and verified) and fetched first; and through dockerd, a retry's `docker
    run` restoring on create, both ways (its timings from the restore.succeeded event)."""
    runs: dict[str, list[float]] = {}
    raw = RawContainer(state, kind, spec)
    store, raw_job = open_store(f"file://{state / 'store'}"), f"{job}-plain"
    try:
        runc = engine.Runc(RUNC, ["--root", str(raw.root)], str(raw.root))
        engine.checkpoint(runc, raw.cid, store, raw_job, {}, Settings(workdir=str(state / "work")))
        for _ in range(REPS):
            runs.setdefault("raw_restore", []).append(raw.restore())
            for key, stream in (("engine_streamed", True), ("engine_fetched", False)):
                settings = Settings(workdir=str(state / "work"), restore_stream=stream)
                runs.setdefault(key, []).append(raw.engine_restore(store, raw_job, settings))
            raw.delete()
            restore_round(d, state, args, job, runs)
    finally:
        raw.close()
    return runs


def restore_round(d: Docker, state: Path, args: list[str], job: str, runs: dict[str, list[float]]) -> None:
    for stream in ("0", "1"):
        settle()
        env = {"MMSHIM_INTERVAL": "3600", "MMSHIM_RESTORE_STREAM": stream}
        cid = d.run_job(job, 2, args, env, IMAGE)
        try:
            events = open_store(f"file://{state / 'store'}").events(job)
            done = [e for e in events if e["event"] == "restore.succeeded"]
            if not done or done[-1]["streamed"] != (stream == "1"):
                raise RuntimeError(f"mmshim did not restore as asked: {json.dumps(events[-2:])}")
        finally:
            d.run("rm", "-f", cid, check=False)
        for key, field in FIELDS[stream]:
            runs.setdefault(key, []).append(done[-1][field])


def staged_layer(d: Docker, state: Path) -> dict[str, list[float]]:
    """Freeze with a big, long-untouched file in the writable layer (see the module docstring)."""
    cid = d.out(
        "run", "-d", "--runtime=runc", "--network", "none", IMAGE, "/bin/memhog", "64", "random"
    ).strip()
    try:
        d.wait_logs(cid, "ready")
        root = d.runc_root
        runc = engine.Runc(RUNC, ["--root", root], root)
        bundle = runc.state(cid)["bundle"]
        with open(Path(bundle) / "config.json") as f:
            rootfs = engine.rootfs_of(json.load(f), bundle)
        with open(os.path.join(rootfs, "staged-input.bin"), "wb") as f:  # as the job would, into its layer
            for _ in range(LAYER_MIB):
                f.write(os.urandom(1 << 20))
        time.sleep(engine.LAYER_COLD_SECONDS + 1)  # left alone since, as staged inputs are
        store, settings = open_store(f"file://{state / 'store'}"), Settings(workdir=str(state / "work"))
        runs: dict[str, list[float]] = {}
        size = LAYER_MIB << 20
        expected = {"file": (size, 0), "urgent": (0, 0), "file_reused": (0, size), "urgent_reused": (0, size)}
        for rep in range(REPS):
            raw_dir, raw_work = state / "raw-layer", state / "raw-layer-work"
            settle()
            t0 = time.monotonic()
            raw_checkpoint(runc, cid, raw_dir, raw_work)
            runs.setdefault("raw_checkpoint", []).append(time.monotonic() - t0)
            runs.setdefault("raw_frozen", []).append(criu_frozen(raw_work))
            shutil.rmtree(raw_dir)
            shutil.rmtree(raw_work)
            for name in ("file", "urgent")[:: 1 if rep % 2 else -1]:
                store.delete("bench-layer")  # the first checkpoint copies the input, the next reuses it
                for key in (name, f"{name}_reused"):
                    settle()
                    t0 = time.monotonic()
                    info = engine.checkpoint(
                        runc, cid, store, "bench-layer", {}, settings, urgent=name == "urgent"
                    )
                    runs.setdefault(f"{key}_checkpoint", []).append(time.monotonic() - t0)
                    runs.setdefault(f"{key}_paused", []).append(info.meta["timings"]["paused_s"])
                    copied = (info.meta["layer"]["copied_later"], info.meta["layer"]["reused"])
                    if copied != expected[key]:  # bytes (read after the resume; not read at all)
                        raise RuntimeError(f"the input was not copied as asked: {info.meta['layer']}")
        return runs
    finally:
        d.run("rm", "-f", cid, check=False)


LAYER_LINES = [
    (
        "container frozen, interval (input read after the resume) vs CRIU frozen time of raw",
        "raw_frozen",
        "file_paused",
    ),
    (
        "container frozen at a Spot notice (input copied frozen) vs CRIU frozen time of raw",
        "raw_frozen",
        "urgent_paused",
    ),
    (
        "container frozen, interval, input unchanged since the last (not read)",
        "raw_frozen",
        "file_reused_paused",
    ),
    (
        "container frozen at a Spot notice, input unchanged since the last",
        "raw_frozen",
        "urgent_reused_paused",
    ),
    (
        "checkpoint committed, interval, input read vs raw runc checkpoint",
        "raw_checkpoint",
        "file_checkpoint",
    ),
    (
        "checkpoint committed, interval, input unchanged (not read) vs raw",
        "raw_checkpoint",
        "file_reused_checkpoint",
    ),
    ("checkpoint committed at a Spot notice, input copied vs raw", "raw_checkpoint", "urgent_checkpoint"),
    (
        "checkpoint committed at a Spot notice, input unchanged vs raw",
        "raw_checkpoint",
        "urgent_reused_checkpoint",
    ),
]


def table(results: dict[str, dict[str, list[float]]]) -> str:
    """Medians, their ratio, and the median of the ratios within each round (``paired``: both
    sides measured in the same round, so a slow spell of the VM weighs on both; "-" where one
    side is measured once)."""
    rows = ["| memory | what | baseline | mmshim | ratio | paired |", "|---|---|---|---|---|---|"]
    lines = [
        ("checkpoint committed, file:// vs raw runc checkpoint to disk", "raw_checkpoint", "file_checkpoint"),
        ("checkpoint committed, file:// vs raw runc checkpoint, then sync", "raw_durable", "file_checkpoint"),
        (
            "  no mmshim: raw runc checkpoint, then sync, vs raw (the floor of a durable commit)",
            "raw_checkpoint",
            "raw_durable",
        ),
        ("  at a Spot notice (writes during the dump) vs raw", "raw_checkpoint", "urgent_checkpoint"),
        ("  at a Spot notice vs raw runc checkpoint, then sync", "raw_durable", "urgent_checkpoint"),
        ("checkpoint committed, s3:// (moto) vs raw runc checkpoint", "raw_checkpoint", "s3_checkpoint"),
        ("  vs raw runc checkpoint, then boto3 upload_file of it", "raw_s3", "s3_checkpoint"),
        ("container frozen (paused) vs CRIU frozen time of raw", "raw_frozen", "file_paused"),
        ("CRIU frozen time inside mmshim vs raw", "raw_frozen", "file_frozen"),
        ("container frozen at a Spot notice vs CRIU frozen time of raw", "raw_frozen", "urgent_paused"),
        ("restore, same runc container: streamed vs runc restore", "raw_restore", "engine_streamed"),
        ("restore, same runc container: fetched first vs runc restore", "raw_restore", "engine_fetched"),
        ("restore on create via dockerd, streamed: whole restore", "raw_restore", "mmshim_restore"),
        ("  of which small images fetched", "raw_restore", "before_runc"),
        ("  of which runc restore reading the stream", "raw_restore", "streamed_runc"),
        ("restore on create via dockerd, fetched first: whole restore", "raw_restore", "fetched_restore"),
        ("  of which fetch + verify + decompress", "raw_restore", "fetch"),
        ("  of which its runc restore (local dir)", "raw_restore", "inner_restore"),
        ("bytes stored: first checkpoint (file://) vs raw image size", "raw_bytes", "file_stored"),
        ("bytes stored: second after 5% touched vs first", "file_stored", "second_stored"),
    ]
    for kind, r in results.items():
        for what, base_key, ours_key in LAYER_LINES if kind.endswith("layer") else lines:
            bases, ourses = r[base_key], r[ours_key]
            base, ours = statistics.median(bases), statistics.median(ourses)
            paired = "-"
            if len(bases) == len(ourses) > 1:
                paired = f"{statistics.median(o / b for b, o in zip(bases, ourses, strict=True)):.3f}"
            unit = (lambda v: f"{v / 2**20:.1f} MiB") if "bytes" in what else (lambda v: f"{v:.2f} s")
            rows.append(f"| {kind} | {what} | {unit(base)} | {unit(ours)} | {ours / base:.3f} | {paired} |")
    return "\n".join(rows)


def main() -> None:
    with bench_host("checkpoint", IMAGE) as (d, state):
        s3 = start_s3(state)
        try:
            boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="bench")
            results = {kind: one_kind(d, state, kind, s3) for kind in ("random", "text")}
            results[f"64 MiB + {LAYER_MIB} MiB layer"] = staged_layer(d, state)
        finally:
            stop_pidfile(state / "moto.pid", timeout=10)
    print(f"Checkpoint/restore of a {MIB} MiB-RSS container (2-core VM; compare ratios within this run)\n")
    print(table(results))


if __name__ == "__main__":
    main()
