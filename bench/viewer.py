"""How fast the viewer's API answers over a 10,000-job file:// store, against the bare store listing.

Builds the store in a temp dir (on /dev/shm when there is one: the disk is not what is measured),
then times, in the same run: the baseline ``Store.jobs()`` (one listing, what any aggregation
needs at least), the overview and jobs API cold (fresh app: every job's digest is read and viewed,
see mmshim.digest) and warm (cached views, within the listing TTL), and a warm refresh after the TTL (only
active jobs read again). Prints a table of absolute times and ratios to the baseline (a noisy
2-core VM: compare ratios). BENCH_JOBS (default 10000) and BENCH_REPEAT (default 15) change the size.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmshim.store import open_store
from mmshim.viewer import make_app, write_sample_store

JOBS = int(os.environ.get("BENCH_JOBS", "10000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "15"))


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def get(client: object, url: str) -> Callable[[], object]:
    def call() -> object:
        r = client.get(url)  # type: ignore[attr-defined]
        assert r.status_code == 200, (url, r.status_code)
        return r.get_json()

    return call


def main() -> None:
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="mmshim-bench-viewer-", dir=where) as tmp:
        t0 = time.perf_counter()
        write_sample_store(tmp, jobs=JOBS, seed=11)
        files = sum(len(f) for _, _, f in os.walk(tmp))
        print(f"store: {JOBS} jobs, {files} files in {tmp}, written in {time.perf_counter() - t0:.1f}s\n")
        url = f"file://{tmp}"
        store = open_store(url)
        base = timed(store.jobs, REPEAT)
        b = statistics.median(base)
        rows: list[tuple[str, list[float]]] = [("baseline: Store.jobs() listing", base)]

        clock = [time.time()]
        cold_overview, cold_jobs = [], []
        for _ in range(2):  # cold = a fresh app whose first request reads the whole store
            app = make_app(url, clock=lambda: clock[0])
            c = app.test_client()
            cold_overview += timed(get(c, "/api/v1/overview"), 1)
            app2 = make_app(url, clock=lambda: clock[0])
            cold_jobs += timed(get(app2.test_client(), "/api/v1/jobs?sort=cost"), 1)
        rows.append(("overview, cold (reads every job)", cold_overview))
        rows.append(("jobs page, cold", cold_jobs))
        rows.append(("overview, warm", timed(get(c, "/api/v1/overview"), REPEAT)))
        rows.append(("jobs page 1 by last event, warm", timed(get(c, "/api/v1/jobs"), REPEAT)))
        rows.append(
            (
                "jobs filtered+sorted by cost, warm",
                timed(get(c, "/api/v1/jobs?status=succeeded,failed&restored=true&sort=cost&page=3"), REPEAT),
            )
        )
        rows.append(("daily series, warm", timed(get(c, "/api/v1/series/daily"), REPEAT)))
        job = get(c, "/api/v1/jobs?per_page=1")()["jobs"][0]["job_id"]  # type: ignore[index]
        rows.append(("one job's detail (always read afresh)", timed(get(c, f"/api/v1/jobs/{job}"), REPEAT)))
        viewer = app.config["VIEWER"]
        refresh = []
        for _ in range(3):
            clock[0] += viewer.ttl + 1  # listing expired: re-list, re-read active jobs only
            refresh += timed(get(c, "/api/v1/overview"), 1)
        rows.append(("overview after TTL (re-list + active jobs)", refresh))

        print("| what | median | min | max | ratio to baseline (median) | runs |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, ts in rows:
            m = statistics.median(ts)
            print(
                f"| {name} | {m * 1000:.1f} ms | {min(ts) * 1000:.1f} ms | {max(ts) * 1000:.1f} ms "
                f"| {m / b:.1f} | {len(ts)} |"
            )


if __name__ == "__main__":
    main()
