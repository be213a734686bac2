"""The cost of being protected: attempt 1 when nothing happens, and restore-on-create on attempt 2.

1. `docker run --rm` of a protected job on attempt 1 (mmshim: create, watcher start, start,
   delete) against the same run on runc.
2. `docker run -d` of attempt 2 of a job that has a checkpoint (restore in place of create)
   until it returns, against a fresh `docker run -d` of the same container (protection off).
Alternated pairs, ratios of medians. Needs root and the host set-up.
"""

import os
import uuid

from common import TABLE_HEAD, bench_host, pairs, ratio_row, timed

from mmshim.demo import workload
from mmshim.localdocker import DOCKER, IMAGE, wait_for
from mmshim.store import open_store

PAIRS = int(os.environ.get("BENCH_PAIRS", "20"))


def main() -> None:
    with bench_host("protection") as (d, state):
        run = [DOCKER, "-H", d.host, "run", "--rm", "--network", "none"]

        def protected() -> float:
            job = ["-e", f"AWS_BATCH_JOB_ID=bench-{uuid.uuid4().hex[:8]}", "-e", "AWS_BATCH_JOB_ATTEMPT=1"]
            return timed([*run, "--runtime=mmshim", *job, IMAGE, "true"])

        unprotected_env = ["-e", "AWS_BATCH_JOB_ID=bench-runc", "-e", "AWS_BATCH_JOB_ATTEMPT=1"]
        rows = [
            ratio_row(
                "attempt 1, nothing happens: `docker run --rm` protected vs runc",
                *pairs(
                    PAIRS, lambda: timed([*run, "--runtime=runc", *unprotected_env, IMAGE, "true"]), protected
                ),
            )
        ]

        # A job with a checkpoint to restore: attempt 1 checkpoints after 1 s, then is reclaimed.
        store = open_store(f"file://{state / 'store'}")
        script = workload(100000, 0.2)
        job = "bench-restore"
        first = d.run_job(job, 1, ["sh", "-c", script], {"MMSHIM_INTERVAL": "1"})
        wait_for(lambda: store.latest_good(job), "a checkpoint to restore from (mmshim log: state dir)", 120)
        d.run("rm", "-f", first)
        detached = [
            DOCKER,
            "-H",
            d.host,
            "run",
            "-d",
            "--network",
            "none",
            "--runtime=mmshim",
            "-e",
            f"AWS_BATCH_JOB_ID={job}",
            "-e",
            "MMSHIM_INTERVAL=3600",
        ]
        started: list[str] = []

        def launch(*extra: str) -> float:
            t = timed([*detached, *extra, IMAGE, "sh", "-c", script])
            started.extend(d.out("ps", "-q").split())
            d.run("rm", "-f", *started, check=False)
            started.clear()
            return t

        rows.append(
            ratio_row(
                "attempt 2: restore on create vs fresh start (`docker run -d` returns)",
                *pairs(
                    max(5, PAIRS // 2),
                    lambda: launch("-e", "AWS_BATCH_JOB_ATTEMPT=2", "-e", "MMSHIM_PROTECT=0"),
                    lambda: launch("-e", "AWS_BATCH_JOB_ATTEMPT=2"),
                ),
            )
        )
        restored = sum(e["event"] == "restore.succeeded" for e in store.events(job))
    print(TABLE_HEAD)
    print("\n".join(rows))
    print(f"\n(restores that succeeded during the run: {restored})")


if __name__ == "__main__":
    main()
