"""Spot protection end to end: a real dockerd, runc, CRIU, S3 on moto and the IMDS emulator."""

import time
import tomllib
import urllib.request
import uuid

import pytest

from mmshim.localdocker import IMAGE, Docker
from mmshim.store import Store, open_store

pytestmark = pytest.mark.integration

# Counts in memory, keeps a file in the writable layer and one in /dev/shm; says which attempt
# STARTED it: a restored process never runs that line again.
JOB = (
    'echo "started by attempt $AWS_BATCH_JOB_ATTEMPT" > /data/started; i=0; '
    "while [ $i -lt 40 ]; do i=$((i+1)); echo $i >> /data/log; echo $i > /dev/shm/count; sleep 0.25; done; "
    'echo "done $i $(wc -l < /data/log) $(cat /dev/shm/count)"; cat /data/started'
)


@pytest.fixture(scope="module")
def store(services_env: dict[str, str], s3_server: str) -> Store:
    with open(services_env["MMSHIM_TEST_CONFIG"], "rb") as f:
        cfg = tomllib.load(f)
    return open_store(cfg["store"], **cfg["store_options"])


def run_job(docker: Docker, job_id: str, attempt: int, *extra: str, script: str = JOB) -> str:
    return docker.out(
        "run", "-d", "--runtime=mmshim", "--network", "none",
        "-e", f"AWS_BATCH_JOB_ID={job_id}", "-e", f"AWS_BATCH_JOB_ATTEMPT={attempt}", *extra,
        IMAGE, "sh", "-c", script,
    ).strip()  # fmt: skip


def wait_for(check, what: str, timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def events(store: Store, job_id: str) -> list[str]:
    return [e["event"] for e in store.events(job_id)]


def finish(docker: Docker, cid: str) -> tuple[int, str]:
    code = int(docker.out("wait", cid).strip())
    return code, docker.out("logs", cid)


def test_interval_checkpoint_then_restore_on_retry(docker: Docker, store: Store) -> None:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    first = run_job(docker, job, 1, "-e", "MMSHIM_INTERVAL=2")
    wait_for(lambda: store.latest_good(job), "an interval checkpoint")
    docker.run("rm", "-f", first)  # the host is reclaimed
    wait_for(lambda: "exit" in events(store, job), "the watcher to see the container go")
    assert store.latest_good(job) is not None  # a failed attempt keeps its checkpoints

    second = run_job(docker, job, 2, "-e", "MMSHIM_INTERVAL=600")
    code, out = finish(docker, second)
    assert code == 0, out
    assert out.splitlines()[-2:] == ["done 40 40 40", "started by attempt 1"]  # resumed, not restarted
    names = events(store, job)
    assert "restore.succeeded" in names and "restore.fallback" not in names
    wait_for(lambda: not store.checkpoints(job), "checkpoints to be deleted after success")


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
        assert info.meta["trigger"] == "spot"
        assert "spot.notice" in events(store, job)
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{imds}/mmshim/reset", method="POST"))
        docker.run("rm", "-f", first)
    second = run_job(docker, job, 2)
    code, out = finish(docker, second)
    assert code == 0 and out.splitlines()[-1] == "started by attempt 1"


def test_store_down_on_retry_starts_fresh(docker: Docker, store: Store) -> None:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    cid = run_job(docker, job, 2, "-e", "MMSHIM_INTERVAL=600", script="echo fresh $AWS_BATCH_JOB_ATTEMPT")
    code, out = finish(docker, cid)
    assert (code, out) == (0, "fresh 2\n")  # nothing to restore: a normal start
    assert "restore.fallback" in events(store, job)


def test_non_batch_and_unprotected_untouched(docker: Docker, store: Store) -> None:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    cid = run_job(
        docker, job, 1, "-e", "MMSHIM_PROTECT=0", "-e", "MMSHIM_INTERVAL=1", script="sleep 3; echo ok"
    )
    assert finish(docker, cid) == (0, "ok\n")
    assert store.events(job) == [] and store.checkpoints(job) == []
