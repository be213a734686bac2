"""Spot protection end to end: a real dockerd, runc, CRIU, S3 on moto and the IMDS emulator."""

import contextlib
import json
import shutil
import socket
import threading
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest

from mmshim.demo import expected, workload
from mmshim.localdocker import IMAGE, Docker, build_image
from mmshim.localdocker import wait_for as poll
from mmshim.store import CheckpointInfo, Store, open_store
from tests.integration.test_engine import from_another_cpu
from tests.services import NO_CRIU_PATH

pytestmark = pytest.mark.integration

JOB = workload(40, 0.25)
PUSHED_AGAIN = "mmshim-test/busybox:pushed-again"


@pytest.fixture(scope="module")
def store(services_env: dict[str, str], s3_server: str) -> Store:
    with open(services_env["MMSHIM_TEST_CONFIG"], "rb") as f:
        cfg = tomllib.load(f)
    return open_store(cfg["store"], **cfg["store_options"])


def run_job(
    docker: Docker,
    job_id: str,
    attempt: int,
    script: str = JOB,
    docker_args: tuple[str, ...] = (),
    network: str = "none",
    **env: str,
) -> str:
    return docker.run_job(
        job_id, attempt, ["sh", "-c", script], env, docker_args=docker_args, network=network
    )


def wait_for(check, what: str, timeout: float = 90) -> object:
    return poll(check, what, timeout, 0.3)


def events(store: Store, job_id: str) -> list[str]:
    return [e["event"] for e in store.events(job_id)]


def events_of(store: Store, job_id: str, attempt: int, name: str) -> list[dict]:
    """The job's events of one name from one attempt."""
    return [e for e in store.events(job_id) if e["attempt"] == attempt and e["event"] == name]


def finish(docker: Docker, cid: str) -> tuple[int, str]:
    code = int(docker.out("wait", cid).strip())
    return code, docker.out("logs", cid)


def reclaimed_after_a_checkpoint(
    docker: Docker,
    store: Store,
    job: str,
    script: str = JOB,
    docker_args: tuple[str, ...] = (),
    network: str = "none",
    **env: str,
) -> CheckpointInfo:
    """Attempt 1 of the job until its first interval checkpoint, then its host is reclaimed (the
    container removed) and its watcher has seen it go: the checkpoint a retry should restore."""
    first = run_job(docker, job, 1, script, docker_args, network, MMSHIM_INTERVAL="2", **env)
    wait_for(lambda: store.latest_good(job), "an interval checkpoint")
    docker.run("rm", "-f", first)
    wait_for(lambda: "exit" in events(store, job), "the watcher to see the container go")
    info = store.latest_good(job)
    assert info is not None  # a failed attempt keeps its checkpoints
    return info


@pytest.mark.parametrize("stream", ["1", "0"])
def test_interval_checkpoint_then_restore_on_retry(docker: Docker, store: Store, stream: str) -> None:
    """Restored on the retry, page images streamed into CRIU (or, "0", fetched first: what a CRIU
    without install/criu-rpc-stream.patch gets)."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    interval = reclaimed_after_a_checkpoint(docker, store, job)
    assert not interval.meta["urgent"]  # writes wait for the resume: the shorter freeze
    second = run_job(docker, job, 2, MMSHIM_INTERVAL="600", MMSHIM_RESTORE_STREAM=stream)
    code, out = finish(docker, second)
    assert code == 0, out
    assert out.splitlines()[-2:] == expected(40)  # resumed, not restarted
    names = events(store, job)
    assert "restore.fallback" not in names
    assert names.index("restore.attempted") < names.index("restore.succeeded")
    assert [e["streamed"] for e in store.events(job) if e["event"] == "restore.succeeded"] == [stream == "1"]
    wait_for(lambda: not store.checkpoints(job), "checkpoints to be deleted after success")


def test_established_tcp_connection_comes_back_closed(docker: Docker, store: Store) -> None:
    """A job holding a TCP connection to a peer outside its container (host network, as Batch
    runs jobs) is checkpointed with it; restored, the connection comes back closed (its peer is
    gone on a new host): the job's client sees it end, and the job finishes from where it was."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peers: list[socket.socket] = []

        def serve() -> None:
            with contextlib.suppress(OSError):
                while True:
                    peers.append(server.accept()[0])

        threading.Thread(target=serve, daemon=True).start()
        port = server.getsockname()[1]
        client = (
            f"while :; do echo ping; sleep 0.2; done | nc 127.0.0.1 {port}; echo connection ended >/data/net"
        )
        script = f"({client}) & {workload(40, 0.25)}; cat /data/net"
        job = f"e2e-{uuid.uuid4().hex[:8]}"
        info = reclaimed_after_a_checkpoint(docker, store, job, script, network="host")
        files = store._read_manifest(job, info.checkpoint_id)[1]
        assert any(f.name.startswith("criu/tcp-stream-") for f in files)  # the connection is in it
        second = run_job(docker, job, 2, script, network="host", MMSHIM_INTERVAL="600")
        code, out = finish(docker, second)
        for peer in peers:
            peer.close()
        assert code == 0, out
        assert out.splitlines()[-3:] == [*expected(40), "connection ended"]  # resumed, not restarted
        assert len(peers) == 1  # nothing connected again
        assert "restore.succeeded" in events(store, job)


# A Nextflow task as its .command.run starts it: in a work dir in the writable layer, the task's
# stdout and stderr go through two named pipes to `tee`s that write .command.out and .command.err.
NXF_TASK = (
    "mkdir -p /tmp/nxf/ab/cdef && cd /tmp/nxf/ab/cdef && mkfifo .command.po .command.pe; "
    "tee .command.out <.command.po & tee .command.err <.command.pe >&2 & "
    '(echo "started by attempt $AWS_BATCH_JOB_ATTEMPT" >&2; '
    "i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo $i; sleep 0.25; done) >.command.po 2>.command.pe; "
    'wait; echo "out: $(tr "\\n" " " <.command.out)| err: $(cat .command.err)"'
)


def test_nextflow_task_with_named_pipes_resumes(docker: Docker, store: Store) -> None:
    """The task, its two tees and the named pipes between them come back (the fifos from the
    writable layer, what was in them from CRIU's image): the logs the tees write are whole."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    reclaimed_after_a_checkpoint(docker, store, job, NXF_TASK)
    second = run_job(docker, job, 2, NXF_TASK, MMSHIM_INTERVAL="600")
    code, out = finish(docker, second)
    assert code == 0, out
    counts = " ".join(str(i) for i in range(1, 41))
    assert out.splitlines()[-1] == f"out: {counts} | err: started by attempt 1"
    assert "restore.succeeded" in events(store, job)


def test_shm_bind_mount_travels_with_the_checkpoint(docker: Docker, store: Store) -> None:
    """With --ipc shareable, /dev/shm is a host bind mount: mmshim carries its contents itself."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    info = reclaimed_after_a_checkpoint(docker, store, job, docker_args=("--ipc", "shareable"))
    assert info.meta["mounts"] == ["/dev/shm"]
    code, out = finish(docker, run_job(docker, job, 2, docker_args=("--ipc", "shareable")))
    assert code == 0 and out.splitlines()[-2:] == expected(40)  # the count in /dev/shm came back


def test_spot_notice_takes_final_checkpoint(
    docker: Docker, store: Store, services_env: dict[str, str]
) -> None:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    imds = services_env["MMSHIM_TEST_IMDS_ENDPOINT"]
    first = run_job(docker, job, 1)  # default interval: 15 minutes, so only the notice checkpoints
    try:
        time.sleep(2)
        urllib.request.urlopen(urllib.request.Request(f"{imds}/mmshim/spot?action=terminate", method="POST"))
        info = wait_for(lambda: store.latest_good(job), "the final checkpoint")
        assert info.meta["trigger"] == "spot" and info.meta["urgent"]  # writes overlapped the dump
        assert "spot.notice" in events(store, job)
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{imds}/mmshim/reset", method="POST"))
        docker.run("rm", "-f", first)
    second = run_job(docker, job, 2)
    code, out = finish(docker, second)
    assert code == 0 and out.splitlines()[-1] == "started by attempt 1"


def test_store_down_on_retry_starts_fresh(docker: Docker, store: Store) -> None:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    cid = run_job(docker, job, 2, MMSHIM_INTERVAL="600", script="echo fresh $AWS_BATCH_JOB_ATTEMPT")
    code, out = finish(docker, cid)
    assert (code, out) == (0, "fresh 2\n")  # nothing to restore: a normal start
    assert "restore.fallback" in events(store, job)


def test_missing_criu_starts_fresh_and_keeps_the_checkpoint(docker: Docker, store: Store) -> None:
    """A retry on a host whose runtime finds no CRIU (not on its PATH) starts fresh and says why;
    its interval checkpoints fail the same way and leave the job alone; the checkpoint it could
    not use stays good, for a host that has CRIU."""
    assert shutil.which("criu", path=NO_CRIU_PATH) is None  # else the runtime would find one
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    kept = reclaimed_after_a_checkpoint(docker, store, job)
    second = run_job(docker, job, 2, docker_args=("--runtime=mmshim-nocriu",), MMSHIM_INTERVAL="1")

    def attempt_2(name: str) -> list[dict]:
        return events_of(store, job, 2, name)

    failed = wait_for(lambda: attempt_2("checkpoint.failed"), "an interval checkpoint to fail")
    assert docker.out("exec", second, "cat", "/data/started") == "started by attempt 2\n"
    docker.run("rm", "-f", second)  # reclaimed again: its checkpoints are kept for the next retry
    wait_for(lambda: attempt_2("exit"), "the second watcher to see the container go")
    (fallback,) = attempt_2("restore.fallback")
    assert "CRIU not found: runc would run criu on PATH" in fallback["reason"]
    assert all("CRIU not found" in e["reason"] for e in failed + attempt_2("checkpoint.failed"))
    assert attempt_2("checkpoint.committed") == [] and store.latest_good(job) == kept


def started_fresh(docker: Docker, store: Store, job: str, second: str) -> dict:
    """Attempt 2 of the job (container ``second``) started fresh, then its host was reclaimed in
    turn; its restore.fallback event, which says why."""

    def attempt_2(name: str) -> list[dict]:
        return events_of(store, job, 2, name)

    wait_for(lambda: attempt_2("start"), "the second watcher to start")  # a fresh start
    assert docker.out("exec", second, "cat", "/data/started") == "started by attempt 2\n"
    docker.run("rm", "-f", second)
    wait_for(lambda: attempt_2("exit"), "the second watcher to see the container go")
    (fallback,) = attempt_2("restore.fallback")
    return fallback


def test_a_checkpoint_from_another_cpu_starts_fresh_and_stays_good(
    docker: Docker, store: Store, tmp_path: Path
) -> None:
    """Batch retries the job on a host whose CPU cannot run its only checkpoint (taken where the
    xsave frame is bigger, as with AVX-512): the job starts fresh instead of dying of SIGILL
    later, the reason says so, and the checkpoint stays good for a host like its own."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    original = reclaimed_after_a_checkpoint(docker, store, job)
    foreign = from_another_cpu(store, job, original, tmp_path)
    store.delete(job, original.checkpoint_id)
    fallback = started_fresh(docker, store, job, run_job(docker, job, 2, MMSHIM_INTERVAL="600"))
    assert f"{foreign.checkpoint_id}: this host's CPU cannot run what was checkpointed" in fallback["reason"]
    assert "CPU xsave size mismatch" in fallback["reason"]
    assert [(c.checkpoint_id, c.state) for c in store.checkpoints(job)] == [(foreign.checkpoint_id, "good")]


def test_an_older_checkpoint_this_cpu_can_run_is_restored(
    docker: Docker, store: Store, tmp_path: Path
) -> None:
    """The newest checkpoint came from a host with another CPU, the one before from a host like
    this: that one is restored, and the event names the checkpoint passed over and why."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    original = reclaimed_after_a_checkpoint(docker, store, job)
    foreign = from_another_cpu(store, job, original, tmp_path)
    code, out = finish(docker, run_job(docker, job, 2))
    assert code == 0 and out.splitlines()[-2:] == expected(40)  # resumed, not restarted
    (done,) = events_of(store, job, 2, "restore.succeeded")
    assert done["checkpoint_id"] == original.checkpoint_id
    assert list(done["passed_over"]) == [foreign.checkpoint_id]
    assert "CPU xsave size mismatch" in done["passed_over"][foreign.checkpoint_id]


def test_a_retry_on_an_image_pushed_again_starts_fresh_and_keeps_the_checkpoint(
    docker: Docker, store: Store, tmp_path: Path
) -> None:
    """Between two attempts the job's tag was pushed again (`:latest`): its checkpoint, whose
    layer diff belongs to the old image, is not laid onto the new one. The job starts fresh on
    the new image, the reason names both image ids, and the checkpoint stays good. A checkpoint
    records the image id and the spec, the environment's names without their values."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    kept = reclaimed_after_a_checkpoint(docker, store, job, SECRET_TOKEN="s3cr3t")
    old = docker.out("image", "inspect", "--format", "{{.Id}}", IMAGE).strip()
    assert kept.meta["image"] == old
    assert "SECRET_TOKEN" in kept.meta["spec"]["process"]["env"] and "s3cr3t" not in json.dumps(kept.meta)
    (tmp_path / "release").write_text("pushed again\n")
    build_image(docker, tmp_path, PUSHED_AGAIN, {"/etc/release": tmp_path / "release"})
    new = docker.out("image", "inspect", "--format", "{{.Id}}", PUSHED_AGAIN).strip()
    assert new != old
    second = docker.run_job(job, 2, ["sh", "-c", JOB], {"MMSHIM_INTERVAL": "600"}, image=PUSHED_AGAIN)
    fallback = started_fresh(docker, store, job, second)
    assert f"{kept.checkpoint_id}: taken on image {old}, this container's is {new}" in fallback["reason"]
    assert [(c.checkpoint_id, c.state) for c in store.checkpoints(job)] == [(kept.checkpoint_id, "good")]


def test_non_batch_and_unprotected_untouched(docker: Docker, store: Store) -> None:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    cid = run_job(docker, job, 1, MMSHIM_PROTECT="0", MMSHIM_INTERVAL="1", script="sleep 3; echo ok")
    assert finish(docker, cid) == (0, "ok\n")
    assert store.events(job) == [] and store.checkpoints(job) == []


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).read()


def test_store_down_at_create_starts_fresh(docker: Docker) -> None:
    """A retry whose store is unreachable runs the job from the start, and it finishes."""
    cid = docker.out(
        "run", "-d", "--runtime=mmshim-deadstore", "--network", "none",
        "-e", "AWS_BATCH_JOB_ID=e2e-deadstore", "-e", "AWS_BATCH_JOB_ATTEMPT=3",
        IMAGE, "sh", "-c", "echo fresh",
    ).strip()  # fmt: skip
    assert finish(docker, cid) == (0, "fresh\n")


def test_array_child_job(docker: Docker, store: Store) -> None:
    job = f"{uuid.uuid4()}:7"  # array children are <parent-id>:<index>
    reclaimed_after_a_checkpoint(docker, store, job, AWS_BATCH_JOB_ARRAY_INDEX="7")
    code, out = finish(docker, run_job(docker, job, 2, AWS_BATCH_JOB_ARRAY_INDEX="7"))
    assert code == 0 and out.splitlines()[-1] == "started by attempt 1"


def reclaimed_with_two_checkpoints(
    docker: Docker, store: Store
) -> tuple[str, CheckpointInfo, CheckpointInfo]:
    """A job's first attempt, reclaimed once it has two good checkpoints: (job, latest, previous)."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    first = run_job(docker, job, 1, MMSHIM_INTERVAL="1.5")
    wait_for(lambda: len([c for c in store.checkpoints(job) if c.state == "good"]) >= 2, "two checkpoints")
    docker.run("rm", "-f", first)
    wait_for(lambda: "exit" in events(store, job), "the watcher to see the container go")
    latest, previous = store.checkpoints(job)[:2]
    return job, latest, previous


def test_corrupt_latest_restores_previous(docker: Docker, store: Store, s3_server: str) -> None:
    import boto3

    from tests.services import E2E_BUCKET

    job, latest, previous = reclaimed_with_two_checkpoints(docker, store)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    key = f"mmshim/jobs/{job}/checkpoints/{latest.checkpoint_id}.json"
    body = s3.get_object(Bucket=E2E_BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=E2E_BUCKET, Key=key, Body=body[: len(body) // 2])  # a truncated manifest
    code, out = finish(docker, run_job(docker, job, 2))
    assert code == 0 and out.splitlines()[-2:] == expected(40)
    succeeded = [e for e in store.events(job) if e["event"] == "restore.succeeded"]
    assert [e["checkpoint_id"] for e in succeeded] == [previous.checkpoint_id]


def test_damage_found_while_streaming_restores_previous(docker: Docker, store: Store, s3_server: str) -> None:
    """A chunk of the latest checkpoint's page images, which CRIU reads while they download, is
    corrupt: that restore fails part-way, the checkpoint is marked bad and the previous one is
    restored (streamed too), in the same create."""
    import json

    import boto3

    from tests.services import E2E_BUCKET

    job, latest, previous = reclaimed_with_two_checkpoints(docker, store)
    s3 = boto3.client("s3", endpoint_url=s3_server)

    def page_chunks(cid: str) -> set[str]:
        key = f"mmshim/jobs/{job}/checkpoints/{cid}.json"
        doc = json.loads(s3.get_object(Bucket=E2E_BUCKET, Key=key)["Body"].read())["manifest"]
        return {c[0] for f in doc["files"] if f["name"].startswith("criu/pages-") for c in f["chunks"]}

    sha = sorted(page_chunks(latest.checkpoint_id) - page_chunks(previous.checkpoint_id))[0]
    chunk = f"mmshim/chunks/{sha[:2]}/{sha}"
    body = bytearray(s3.get_object(Bucket=E2E_BUCKET, Key=chunk)["Body"].read())
    body[len(body) // 2] ^= 0xFF  # one flipped bit in the middle: the hash tells
    s3.put_object(Bucket=E2E_BUCKET, Key=chunk, Body=bytes(body))
    code, out = finish(docker, run_job(docker, job, 2))
    assert code == 0 and out.splitlines()[-2:] == expected(40)
    succeeded = [e for e in store.events(job) if e["event"] == "restore.succeeded"]
    assert [(e["checkpoint_id"], e["streamed"]) for e in succeeded] == [(previous.checkpoint_id, True)]
    assert "restore.fallback" not in events(store, job)


def test_a_job_that_ends_at_once_still_shows_its_start_and_exit(docker: Docker, store: Store) -> None:
    """A job that fails as it starts (a bad parameter, a missing input) is gone, bundle and all,
    before its watcher has finished loading: the attempt still shows its start and exit code."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    assert finish(docker, run_job(docker, job, 1, script="exit 3"))[0] == 3
    wait_for(lambda: "exit" in events(store, job), "the exit event")
    assert events(store, job) == ["start", "exit"]
    assert store.events(job)[-1]["exit_code"] == 3


def test_failed_job_keeps_checkpoints(docker: Docker, store: Store) -> None:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    cid = run_job(docker, job, 1, MMSHIM_INTERVAL="1", script="sleep 4; exit 1")
    assert finish(docker, cid)[0] == 1
    wait_for(lambda: "exit" in events(store, job), "the exit event")
    exits = [e for e in store.events(job) if e["event"] == "exit"]
    assert exits[0]["exit_code"] == 1
    assert store.latest_good(job) is not None


def test_watcher_never_holds_output_and_dies_with_container(docker: Docker, tmp_path) -> None:
    cidfile = tmp_path / "cid"
    proc = docker.run(
        "run", "--rm", "--cidfile", str(cidfile), "--runtime=mmshim", "--network", "none",
        "-e", f"AWS_BATCH_JOB_ID=e2e-{uuid.uuid4().hex[:8]}", "-e", "MMSHIM_INTERVAL=600",
        IMAGE, "sh", "-c", "sleep 1; echo ok", timeout=60,
    )  # fmt: skip
    assert proc.stdout == "ok\n"  # returned when the job ended: no fd of the container's output held
    cid = cidfile.read_text().strip()

    def watcher_gone() -> bool:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if b"mmshim.watcher" in cmdline.read_bytes() and cid.encode() in cmdline.read_bytes():
                    return False
            except OSError:
                continue
        return True

    wait_for(watcher_gone, "the watcher to exit", timeout=30)


def test_one_notice_two_containers_both_commit(
    docker: Docker, store: Store, services_env: dict[str, str]
) -> None:
    imds = services_env["MMSHIM_TEST_IMDS_ENDPOINT"]
    jobs = [f"e2e-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    cids = [run_job(docker, job, 1) for job in jobs]
    try:
        time.sleep(1.5)
        post(f"{imds}/mmshim/spot?action=terminate")
        for job in jobs:
            wait_for(lambda job=job: store.latest_good(job), f"the final checkpoint of {job}")
    finally:
        post(f"{imds}/mmshim/reset")
        docker.run("rm", "-f", *cids)


def test_imds_faults_do_not_stop_the_watcher(
    docker: Docker, store: Store, services_env: dict[str, str]
) -> None:
    imds = services_env["MMSHIM_TEST_IMDS_ENDPOINT"]
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    cid = run_job(docker, job, 1)
    try:
        post(f"{imds}/mmshim/fault?mode=500&count=6")
        time.sleep(2)
        post(f"{imds}/mmshim/fault?mode=expire-tokens&count=1")
        post(f"{imds}/mmshim/spot?action=terminate")
        info = wait_for(lambda: store.latest_good(job), "a checkpoint after IMDS recovered")
        assert info.meta["trigger"] == "spot" and info.meta["urgent"]  # writes overlapped the dump
    finally:
        post(f"{imds}/mmshim/reset")
        docker.run("rm", "-f", cid)
