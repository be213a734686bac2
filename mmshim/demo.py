"""The README's main job: a Spot reclaim and a Batch retry, on this one machine, no AWS account.

A protected job (it counts in memory and writes files) runs through a private dockerd with
`--runtime=mmshim`, takes an interval checkpoint, gets a Spot notice from the IMDS emulator and
takes its final checkpoint, and then loses its "host" (the container is killed and removed).
Attempt 2 starts as Batch would start it (new container, same job id, AWS_BATCH_JOB_ATTEMPT=2),
mmshim restores it, and it finishes with the result an uninterrupted run gives.
"""

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from mmshim.imds_emulator import Emulator
from mmshim.localdocker import Docker, build_image, start_dockerd, stop_dockerd, wait_for
from mmshim.store import Store, open_store


def workload(steps: int, period: float) -> str:
    """Counts in memory, appends to a file in the writable layer, keeps its count in /dev/shm, and
    says which attempt STARTED it: a restored process never runs that line again."""
    return (
        'echo "started by attempt $AWS_BATCH_JOB_ATTEMPT" > /data/started; i=0; '
        f"while [ $i -lt {steps} ]; do i=$((i+1)); echo $i >> /data/log; echo $i > /dev/shm/count; "
        f"sleep {period}; done; "
        'echo "done $i $(wc -l < /data/log) $(cat /dev/shm/count)"; cat /data/started'
    )


def expected(steps: int) -> list[str]:
    return [f"done {steps} {steps} {steps}", "started by attempt 1"]


def wait_event(store: Store, job: str, name: str, attempt: int = 1) -> dict:
    def found() -> dict | None:
        return next((e for e in store.events(job) if e["event"] == name and e["attempt"] == attempt), None)

    return wait_for(found, f"the {name} event of attempt {attempt}", 120, 0.3)


def timeline(store: Store, job: str) -> str:
    lines = []
    for e in store.events(job):
        stamp = datetime.fromtimestamp(e["time"], UTC).strftime("%H:%M:%S.%f")[:-3]
        details = {
            k: e[k]
            for k in (
                "trigger",
                "checkpoint_id",
                "size",
                "stored",
                "duration_s",
                "frozen_s",
                "action",
                "exit_code",
                "reason",
                "progress_s",
            )
            if e.get(k) is not None
        }
        text = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in details.items())
        lines.append(f"  {stamp}  attempt {e['attempt']}  {e['event']:<21} {text}")
    return "\n".join(lines)


def run(state: Path, steps: int, period: float, interval: float, store_dir: Path) -> int:
    with Emulator(host="127.0.0.1", port=0) as imds:
        config = state / "mmshim.toml"
        config.write_text(
            f'store = "file://{store_dir}"\nworkdir = "{state / "work"}"\nlog_dir = "{state / "log"}"\n'
            f'imds_endpoint = "{imds.endpoint}"\nimds_poll = 0.5\n'
            f'docker_host = "unix://{state / "docker" / "docker.sock"}"\n'
        )
        print(f"[demo] private dockerd under {state}, mmshim registered; store file://{store_dir}")
        docker = Docker(start_dockerd(state / "docker", {"MMSHIM_CONFIG": str(config)}))
        build_image(docker, state)
        store = open_store(f"file://{store_dir}")
        job = f"demo-{uuid.uuid4().hex[:8]}"
        script = workload(steps, period)

        def attempt(n: int) -> str:
            return docker.run_job(job, n, ["sh", "-c", script], {"MMSHIM_INTERVAL": str(interval)})

        t0 = time.monotonic()
        print(f"[demo] attempt 1 of job {job}: {steps} steps of {period}s, checkpoint every {interval}s")
        first = attempt(1)
        wait_event(store, job, "checkpoint.committed")
        print("[demo] interval checkpoint committed; sending a Spot interruption notice")
        imds.trigger_spot("terminate")
        wait_for(
            lambda: any(c.meta.get("trigger") == "spot" for c in store.checkpoints(job)),
            "the final checkpoint after the notice",
            60,
            0.3,
        )
        ran = time.monotonic() - t0
        docker.run("rm", "-f", first)
        print(f"[demo] final checkpoint committed; host reclaimed after {ran:.1f}s of work")
        wait_event(store, job, "exit")
        imds.reset()

        print("[demo] attempt 2: Batch retries the job on a new container")
        t1 = time.monotonic()
        second = attempt(2)
        code = int(docker.out("wait", second).strip())
        out = docker.out("logs", second)
        took = time.monotonic() - t1
        restored = wait_event(store, job, "restore.succeeded", attempt=2)
        wait_event(store, job, "exit", attempt=2)
        print(f"[demo] attempt 2 exited {code} after {took:.1f}s; its output ends with:")
        print("".join(f"    {line}\n" for line in out.splitlines()[-2:]), end="")
        print("[demo] timeline (from the store's events):")
        print(timeline(store, job))
        full = steps * period
        ok = code == 0 and out.splitlines()[-2:] == expected(steps)
        print(
            f"[demo] restored from {restored['checkpoint_id']}: {restored['progress_s']:.1f}s of compute "
            f"kept of a {full:.0f}s job; starting over would have repeated it"
        )
        print("[demo] result: " + ("same output as an uninterrupted run" if ok else "UNEXPECTED OUTPUT"))
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--period", type=float, default=0.25)
    parser.add_argument("--interval", type=float, default=4.0)
    parser.add_argument("--keep-store", type=Path, metavar="DIR", help="keep the store here, for the viewer")
    args = parser.parse_args()
    if not shutil.which("dockerd"):
        print("dockerd is missing: run `make demo` (install/setup-host.sh installs it)", file=sys.stderr)
        return 1
    state = Path(tempfile.mkdtemp(prefix="mmdemo-", dir="/tmp"))
    store_dir = args.keep_store.resolve() if args.keep_store else state / "store"
    try:
        code = run(state, args.steps, args.period, args.interval, store_dir)
        if args.keep_store:
            print(f"[demo] the store is kept: `mmshimctl --store file://{store_dir} serve` shows the story")
        return code
    finally:
        stop_dockerd(state / "docker")
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
