"""Tests of the web viewer's JSON API (mmshim.viewer) over generated file:// stores."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmshim import digest
from mmshim.store import Store, StoreError, open_store
from mmshim.viewer import Viewer, make_app, summarize, write_sample_store

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = 1_790_000_000.0  # 2026-09-21T13:33:20Z
JOB_A = "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"  # spot reclaim, restored, succeeded
JOB_B = "b0000000-0000-4000-8000-000000000002"  # failed, no restore
JOB_C = "c0000000-0000-4000-8000-000000000003:7"  # reclaimed, restore fell back, running
PRICES = {
    "date": "2026-01-01",
    "region": "us-east-1",
    "currency": "USD",
    "note": "test prices",
    "instances": {
        "m5.xlarge": {"vcpus": 4, "on_demand": 0.2, "spot": 0.08},
        "c5.2xlarge": {"vcpus": 8, "on_demand": 0.4, "spot": 0.1},
    },
}


def base(job: str, attempt: int, host: str, itype: str = "m5.xlarge", lifecycle: str = "spot") -> dict:
    return {
        "job_id": job,
        "attempt": attempt,
        "container_id": f"ctr-{attempt}",
        "host": host,
        "instance_id": f"i-{attempt:017x}",
        "instance_type": itype,
        "lifecycle": lifecycle,
        "queue": "q-spot" if lifecycle == "spot" else "q-od",
        "compute_env": "ce1",
        "vcpus": 4.0,
    }


def save_checkpoint(store: Store, tmp: Path, job: str, log_text: str, meta: dict) -> str:
    src = tmp / f"src-{job.replace(':', '_')}-{time.monotonic_ns()}"
    (src / "logs").mkdir(parents=True)
    (src / "criu").mkdir()
    (src / "criu" / "pages-1.img").write_bytes(os.urandom(1000))
    (src / "logs" / "dump.log").write_text(log_text)
    return store.save(job, src, meta).checkpoint_id


def fill_store(store: Store, tmp: Path) -> dict[str, Any]:
    """Three jobs with known histories; returns their checkpoint ids."""
    ev = store.put_event
    a1, a2 = base(JOB_A, 1, "host-a"), base(JOB_A, 2, "host-b")
    ev(JOB_A, {**a1, "time": T0, "event": "start"})
    ev(JOB_A, {**a1, "time": T0 + 1800, "event": "checkpoint.started", "trigger": "interval"})
    cid1 = save_checkpoint(store, tmp, JOB_A, "dump one ok\n", {"trigger": "interval"})
    ev(
        JOB_A,
        {
            **a1,
            "time": T0 + 1810,
            "event": "checkpoint.committed",
            "checkpoint_id": cid1,
            "trigger": "interval",
            "size": 1000,
            "stored": 900,
            "duration_s": 10.0,
            "frozen_s": 4.0,
        },
    )
    ev(
        JOB_A,
        {**a1, "time": T0 + 3480, "event": "spot.notice", "action": "terminate", "notice_time": T0 + 3600},
    )
    ev(JOB_A, {**a1, "time": T0 + 3481, "event": "checkpoint.started", "trigger": "spot"})
    cid2 = save_checkpoint(store, tmp, JOB_A, "dump two <b>ok</b>\n", {"trigger": "spot"})
    ev(
        JOB_A,
        {
            **a1,
            "time": T0 + 3501,
            "event": "checkpoint.committed",
            "checkpoint_id": cid2,
            "trigger": "spot",
            "size": 1000,
            "stored": 100,
            "duration_s": 20.0,
            "frozen_s": 8.0,
        },
    )
    ev(JOB_A, {**a1, "time": T0 + 3599, "event": "exit", "exit_code": 137})
    ev(JOB_A, {**a2, "time": T0 + 4000, "event": "restore.attempted", "checkpoint_id": cid2})
    ev(
        JOB_A,
        {
            **a2,
            "time": T0 + 4030,
            "event": "restore.succeeded",
            "checkpoint_id": cid2,
            "duration_s": 30.0,
            "progress_s": 3500.0,
        },
    )
    ev(JOB_A, {**a2, "time": T0 + 4000 + 7200, "event": "exit", "exit_code": 0})

    b1 = base(JOB_B, 1, "host-c", "c5.2xlarge", "on-demand")
    ev(JOB_B, {**b1, "time": T0 + 86400, "event": "start"})
    ev(JOB_B, {**b1, "time": T0 + 86400 + 60, "event": "checkpoint.started", "trigger": "manual"})
    ev(
        JOB_B,
        {
            **b1,
            "time": T0 + 86400 + 70,
            "event": "checkpoint.failed",
            "trigger": "manual",
            "reason": "criu dump: exit 1",
        },
    )
    ev(JOB_B, {**b1, "time": T0 + 86400 + 3600, "event": "exit", "exit_code": 2})

    c1, c2 = base(JOB_C, 1, "host-d", "r9.weird"), base(JOB_C, 2, "host-e")
    ev(JOB_C, {**c1, "time": T0 + 2 * 86400, "event": "start"})
    cid3 = save_checkpoint(store, tmp, JOB_C, "c dump\n", {"trigger": "interval"})
    ev(
        JOB_C,
        {
            **c1,
            "time": T0 + 2 * 86400 + 600,
            "event": "checkpoint.committed",
            "checkpoint_id": cid3,
            "trigger": "interval",
            "size": 1000,
            "stored": 1000,
            "duration_s": 5.0,
            "frozen_s": 2.0,
        },
    )
    ev(
        JOB_C,
        {
            **c1,
            "time": T0 + 2 * 86400 + 1000,
            "event": "spot.notice",
            "action": "terminate",
            "notice_time": T0 + 2 * 86400 + 1120,
        },
    )
    ev(JOB_C, {**c2, "time": T0 + 2 * 86400 + 2000, "event": "restore.attempted", "checkpoint_id": cid3})
    ev(
        JOB_C,
        {
            **c2,
            "time": T0 + 2 * 86400 + 2010,
            "event": "restore.fallback",
            "checkpoint_id": cid3,
            "reason": "criu restore failed: <script>alert(1)</script>",
        },
    )
    ev(JOB_C, {**c2, "time": T0 + 2 * 86400 + 2011, "event": "start"})
    return {"a": [cid1, cid2], "c": [cid3]}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path / "store"
    store = open_store(f"file://{root}", chunk_size=4096)
    cids = fill_store(store, tmp_path)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    now = [T0 + 2 * 86400 + 2100]
    app = make_app(f"file://{root}", prices_path=prices, clock=lambda: now[0])
    yield {
        "app": app,
        "client": app.test_client(),
        "store": store,
        "cids": cids,
        "now": now,
        "root": root,
        "prices": prices,
    }


def get(client: Any, url: str, status: int = 200, **kw: Any) -> Any:
    r = client.get(url, **kw)
    assert r.status_code == status, (url, r.status_code, r.data[:300])
    return r.get_json() if r.is_json else r


def test_overview_numbers(env: dict[str, Any]) -> None:
    o = get(env["client"], "/api/v1/overview")
    assert o["jobs"] == 3
    assert o["jobs_protected"] == 2  # A and C have checkpoints; B's only one failed
    assert o["jobs_restored"] == 1
    assert o["statuses"]["succeeded"] == 1 and o["statuses"]["failed"] == 1 and o["statuses"]["running"] == 1
    assert o["restores"] == {"attempted": 2, "succeeded": 1, "fallbacks": 1, "success_rate": 0.5}
    assert o["checkpoints"]["taken"] == 3 and o["checkpoints"]["failed"] == 1
    assert o["checkpoints"]["in_store"] == 3
    assert o["checkpoints"]["bytes_stored"] > 0
    assert o["spot_notices"] == 2
    assert o["compute_hours_kept"] == pytest.approx(3500 * 4 / 3600)
    cost = o["cost"]
    # A1: T0 .. T0+3600 (reclaimed at notice time) spot m5.xlarge, vcpus 4 of 4 -> 1 h at 0.08
    # A2: 7200 s spot m5.xlarge; B: 3600 s on-demand c5.2xlarge, 4 of 8 vcpus -> 0.5 * 0.4
    # C1: r9.weird is not priced; C2: 11 s spot m5.xlarge, still running
    a1, a2, b, c2 = 3600 / 3600, 7200 / 3600, 1.0, 11 / 3600
    assert cost["actual_usd"] == pytest.approx((a1 + a2 + c2) * 0.08 + b * 0.2)
    assert cost["on_demand_equivalent_usd"] == pytest.approx((a1 + a2 + c2) * 0.2 + b * 0.2)
    assert cost["savings_usd"] == pytest.approx((a1 + a2 + c2) * 0.12)
    assert cost["kept_usd"] == pytest.approx(3500 / 3600 * 0.08)
    assert cost["kept_on_demand_usd"] == pytest.approx(3500 / 3600 * 0.2)
    assert cost["instance_hours"]["on-demand"] == pytest.approx(1.0)
    assert cost["unpriced_hours"] == {"r9.weird": pytest.approx(1120 / 3600)}
    assert o["prices"]["date"] == "2026-01-01"


def test_jobs_list_sort_filter_page(env: dict[str, Any]) -> None:
    c = env["client"]
    r = get(c, "/api/v1/jobs")
    assert r["total"] == 3
    assert [j["job_id"] for j in r["jobs"]] == [JOB_C, JOB_B, JOB_A]  # newest activity first
    a = next(j for j in r["jobs"] if j["job_id"] == JOB_A)
    assert a["status"] == "succeeded" and a["attempts"] == 2 and a["checkpoints"] == 2
    assert a["restored"] is True and a["hosts"] == ["host-a", "host-b"]
    assert a["last_event"]["event"] == "exit" and a["bytes_stored"] > 0
    assert r["facets"]["queues"] == ["q-od", "q-spot"]
    assert get(c, "/api/v1/jobs?sort=job_id&order=asc")["jobs"][0]["job_id"] == JOB_A
    page2 = get(c, "/api/v1/jobs?sort=job_id&per_page=2&page=2")
    assert page2["pages"] == 2 and [j["job_id"] for j in page2["jobs"]] == [JOB_C]
    assert [j["job_id"] for j in get(c, "/api/v1/jobs?status=failed")["jobs"]] == [JOB_B]
    assert {j["job_id"] for j in get(c, "/api/v1/jobs?status=failed,running")["jobs"]} == {JOB_B, JOB_C}
    assert [j["job_id"] for j in get(c, "/api/v1/jobs?queue=q-od")["jobs"]] == [JOB_B]
    assert [j["job_id"] for j in get(c, "/api/v1/jobs?restored=true")["jobs"]] == [JOB_A]
    assert len(get(c, "/api/v1/jobs?restored=false")["jobs"]) == 2
    day1 = time.strftime("%Y-%m-%d", time.gmtime(T0 + 86400))
    assert [j["job_id"] for j in get(c, f"/api/v1/jobs?from={day1}&to={day1}")["jobs"]] == [JOB_B]
    assert [j["job_id"] for j in get(c, "/api/v1/jobs?q=:7")["jobs"]] == [JOB_C]
    assert get(c, "/api/v1/jobs?sort=cost&order=desc")["jobs"][0]["job_id"] == JOB_A
    for bad in (
        "sort=nope",
        "order=up",
        "page=0",
        "per_page=9999",
        "status=zombie",
        "from=yesterday",
        "restored=maybe",
        "page=x",
    ):
        assert get(c, f"/api/v1/jobs?{bad}", 400)["error"] == "bad_request"


def test_job_detail(env: dict[str, Any]) -> None:
    d = get(env["client"], f"/api/v1/jobs/{JOB_A}")
    assert d["job"]["status"] == "succeeded"
    at = d["attempts"]
    assert [(a["attempt"], a["host"], a["outcome"], a["mode"]) for a in at] == [
        (1, "host-a", "reclaimed", "fresh"),
        (2, "host-b", "succeeded", "restored"),
    ]
    assert at[0]["start"] == T0 and at[0]["spot_notice"] == T0 + 3600 and at[0]["exit_code"] == 137
    assert at[1]["restored_from"] == env["cids"]["a"][1] and at[1]["progress_s"] == 3500.0
    cps = d["checkpoints"]
    assert [c["checkpoint_id"] for c in cps] == env["cids"]["a"][::-1]  # newest first
    assert [c["trigger"] for c in cps] == ["spot", "interval"]
    assert cps[0]["duration_s"] == 20.0 and cps[0]["state"] == "good" and cps[0]["size"] == 1000 + 19
    assert len(d["events"]) == 10 and d["events"][0]["event"] == "start"
    c = get(env["client"], f"/api/v1/jobs/{JOB_C}")
    assert c["job"]["status"] == "running"
    assert c["attempts"][1]["mode"] == "fallback"
    assert "criu restore failed" in c["attempts"][1]["fallback_reason"]
    assert c["attempts"][0]["outcome"] == "reclaimed"


def test_status_from_events(env: dict[str, Any]) -> None:
    store, c, now = env["store"], env["client"], env["now"]
    job = "d0000000-0000-4000-8000-000000000004"
    b = base(job, 1, "host-f")
    store.put_event(job, {**b, "time": T0, "event": "start"})
    store.put_event(job, {**b, "time": T0 + 10, "event": "restore.attempted", "checkpoint_id": "x"})
    now[0] = T0 + 20
    assert get(c, f"/api/v1/jobs/{job}")["job"]["status"] == "restoring"
    store.put_event(job, {**b, "time": T0 + 30, "event": "spot.notice", "notice_time": T0 + 150})
    assert get(c, f"/api/v1/jobs/{job}")["job"]["status"] == "running"  # notice not yet due
    now[0] = T0 + 1000
    assert get(c, f"/api/v1/jobs/{job}")["job"]["status"] == "interrupted"
    job2 = "e0000000-0000-4000-8000-000000000005"
    store.put_event(job2, {**base(job2, 1, "h"), "time": T0, "event": "start"})
    now[0] = T0 + 7 * 3600
    assert get(c, f"/api/v1/jobs/{job2}")["job"]["status"] == "stale"


def test_daily_series(env: dict[str, Any]) -> None:
    days = get(env["client"], "/api/v1/series/daily")["days"]
    assert [d["date"] for d in days] == [
        time.strftime("%Y-%m-%d", time.gmtime(T0 + i * 86400)) for i in range(3)
    ]
    d0 = days[0]
    assert d0["checkpoints"] == 2 and d0["ckpt_size_mean"] == 1000 and d0["ckpt_duration_max"] == 20.0
    assert d0["ckpt_duration_mean"] == 15.0 and d0["restores_succeeded"] == 1
    assert (
        d0["spot_notices"] == 1
        and d0["cost_usd"] > 0
        and d0["kept_vcpu_hours"] == pytest.approx(3500 * 4 / 3600)
    )
    assert (
        days[1]["checkpoints_failed"] == 1
        and days[1]["checkpoints"] == 0
        and days[1]["ckpt_size_mean"] is None
    )
    assert days[2]["fallbacks"] == 1
    assert sum(d["cost_usd"] for d in days) == pytest.approx(
        get(env["client"], "/api/v1/overview")["cost"]["actual_usd"]
    )
    one = get(env["client"], f"/api/v1/series/daily?from={days[1]['date']}&to={days[1]['date']}")["days"]
    assert [d["date"] for d in one] == [days[1]["date"]]


def test_not_found_and_traversal(env: dict[str, Any]) -> None:
    c = env["client"]
    for bad in ("nope-0000", "..", "..%2F..%2Fetc", "%2E%2E", "a%00b", "x" * 200, "-leading"):
        r = c.get(f"/api/v1/jobs/{bad}")
        assert r.status_code == 404 and r.is_json, bad
        r = c.get(f"/jobs/{bad}")
        assert r.status_code == 404 and b"not found" in r.data.lower(), bad
    r = c.get("/api/v1/jobs/../../etc/passwd")
    assert r.status_code == 404
    assert c.get(f"/api/v1/jobs/{JOB_A}/bundle.tar.gz/../x").status_code == 404
    assert c.get("/api/v1/jobs/nope-0000/bundle.tar.gz").status_code == 404
    for path in (
        "/static/../viewer.py",
        "/static/%2e%2e/viewer.py",
        "/static/..%2fviewer.py",
        "/static/..%2f..%2fstore.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/vendor/../../prices.json",
    ):
        r = c.get(path, follow_redirects=True)  # werkzeug redirects "//" to "/" first
        assert r.status_code == 404, path
        assert b"import" not in r.data and b"root:" not in r.data and b"on_demand" not in r.data, path
    assert c.get("/static/app.js").status_code == 200
    assert c.get("/nowhere").status_code == 404
    assert c.get("/api/v1/nowhere").is_json


def test_token(env: dict[str, Any]) -> None:
    app = make_app(f"file://{env['root']}", token="s3cret", prices_path=env["prices"])
    c = app.test_client()
    for path in (
        "/",
        "/api/v1/overview",
        "/static/app.js",
        f"/jobs/{JOB_A}",
        f"/api/v1/jobs/{JOB_A}/bundle.tar.gz",
    ):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert c.get(path + "?token=wrong").status_code == 401, path
    assert c.get("/api/v1/overview").get_json()["error"] == "unauthorized"
    assert c.get("/api/v1/overview", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.get("/?token=s3cret")
    assert r.status_code == 200 and "mmshim_viewer_token" in r.headers.get("Set-Cookie", "")
    assert "HttpOnly" in r.headers["Set-Cookie"]
    assert c.get("/api/v1/overview").status_code == 200  # the cookie now
    c2 = app.test_client()
    assert c2.get("/static/app.js?token=s3cret").status_code == 200


def test_log_bundle(env: dict[str, Any]) -> None:
    r = get(env["client"], f"/api/v1/jobs/{JOB_A}/bundle.tar.gz")
    assert r.mimetype == "application/gzip"
    assert "attachment" in r.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.data), mode="r:gz") as tar:
        names = tar.getnames()
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    cid1, cid2 = env["cids"]["a"]
    root = JOB_A
    assert f"{root}/events.json" in names and f"{root}/job.json" in names
    assert all(n.startswith(root + "/") and ".." not in n for n in names)
    assert len(json.loads(files[f"{root}/events.json"])) == 10
    assert files[f"{root}/checkpoints/{cid1}/logs/dump.log"] == b"dump one ok\n"
    assert files[f"{root}/checkpoints/{cid2}/logs/dump.log"] == b"dump two <b>ok</b>\n"
    info = json.loads(files[f"{root}/checkpoints/{cid2}/checkpoint.json"])
    assert (
        info["trigger"] == "spot"
        and info["logs"] == ["logs/dump.log"]
        and info["meta"] == {"trigger": "spot"}
    )
    assert not any("pages-1.img" in n for n in names)
    # Array child ids (with ':') get a safe file name; over-limit checkpoints say why
    v: Viewer = env["app"].config["VIEWER"]
    v.bundle_fetch_limit = 10
    r = get(env["client"], f"/api/v1/jobs/{JOB_C}/bundle.tar.gz")
    assert JOB_C.replace(":", "_") in r.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.data), mode="r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    cid3 = env["cids"]["c"][0]
    info = json.loads(files[f"{JOB_C.replace(':', '_')}/checkpoints/{cid3}/checkpoint.json"])
    assert "fetch limit" in info["logs_note"] and info["logs"] == []


def test_cache_ttl_and_active_refresh(env: dict[str, Any]) -> None:
    v: Viewer = env["app"].config["VIEWER"]
    store, now = env["store"], env["now"]
    reads: list[str] = []
    orig = v._load

    def counting(job: str) -> Any:
        reads.append(job)
        return orig(job)

    v._load = counting  # type: ignore[method-assign]
    assert v.overview()["jobs"] == 3
    assert sorted(reads) == sorted([JOB_A, JOB_B, JOB_C])
    reads.clear()
    job = "f0000000-0000-4000-8000-000000000006"
    store.put_event(job, {**base(job, 1, "h"), "time": now[0], "event": "start"})
    assert v.overview()["jobs"] == 3  # listing still fresh
    assert reads == []
    now[0] += v.ttl + 1
    assert v.overview()["jobs"] == 4
    assert sorted(reads) == sorted([job, JOB_C])  # the new one and the running one; settled ones not
    reads.clear()
    now[0] += v.max_age + 1
    v.overview()
    assert sorted(reads) == sorted([job, JOB_A, JOB_B, JOB_C])
    store.delete(job)
    now[0] += v.ttl + 1
    assert v.overview()["jobs"] == 3


def test_pages_served(env: dict[str, Any]) -> None:
    c = env["client"]
    r = get(c, "/")
    assert b"<html" in r.data and "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert b"<html" in get(c, f"/jobs/{JOB_C}").data
    assert get(c, "/static/vendor/echarts.min.js").status_code == 200
    assert get(c, "/api/v1")["version"] == 1


def test_serve_cli(tmp_path: Path) -> None:
    """python -m mmshim.viewer (what serve() runs) binds 127.0.0.1 and enforces the env token."""
    root = tmp_path / "s"
    write_sample_store(root, jobs=5)
    env = dict(os.environ, MMSHIM_VIEWER_TOKEN="tok")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmshim.viewer", f"file://{root}", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "api/v1/overview", timeout=10)
        assert e.value.code == 401
        req = urllib.request.Request(url + "api/v1/overview", headers={"Authorization": "Bearer tok"})
        deadline = time.monotonic() + 20
        while True:
            o = json.load(urllib.request.urlopen(req, timeout=10))
            if o["jobs"] == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert o["jobs"] == 5
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------------------------------------
# 10,000 jobs


@pytest.fixture(scope="module")
def big_store() -> Iterator[str]:
    shm = Path("/dev/shm")
    base_dir = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="mmshim-viewer-10k-", dir=base_dir) as tmp:
        t = time.perf_counter()
        ids = write_sample_store(tmp, jobs=10_000, seed=7)
        print(f"wrote 10,000 jobs in {time.perf_counter() - t:.1f}s")
        assert len(set(ids)) == 10_000
        yield f"file://{tmp}"


def test_ten_thousand_jobs(big_store: str) -> None:
    app = make_app(big_store)
    c = app.test_client()
    o = get(c, "/api/v1/overview")
    assert o["jobs"] == 10_000 and o["loading"] is None
    assert o["restores"]["attempted"] > 0 and o["checkpoints"]["taken"] > 0 and o["cost"]["actual_usd"] > 0
    for url in (
        "/api/v1/overview",
        "/api/v1/jobs",
        "/api/v1/jobs?sort=cost&status=succeeded,failed&page=3",
        "/api/v1/jobs?restored=true&queue=genomics-spot&sort=bytes_stored",
        "/api/v1/series/daily",
    ):
        assert get(c, url)  # speed is bench/viewer.py's business
    page = get(c, "/api/v1/jobs?per_page=500&page=20")
    assert page["total"] == 10_000 and len(page["jobs"]) == 500
    job = page["jobs"][0]["job_id"]
    d = get(c, f"/api/v1/jobs/{job}")
    assert d["job"]["job_id"] == job


# ---------------------------------------------------------------------------------------------
# Digests: what the store keeps per job must say what the events and checkpoints say


def views_agree(store: Store, job: str, now: float) -> None:
    kept = store.digest(job)
    assert kept is not None
    from_store = digest.view(job, kept, PRICES, now, 6 * 3600)
    assert from_store == summarize(job, store.events(job), store.checkpoints(job), PRICES, now)


def test_store_digest_follows_events_and_checkpoints(env: dict[str, Any], tmp_path: Path) -> None:
    store, now = env["store"], env["now"][0]
    for job in (JOB_A, JOB_B, JOB_C):
        views_agree(store, job, now)
    assert store.digest(JOB_A)["checkpoints"].keys() == set(env["cids"]["a"])
    cid_new = save_checkpoint(store, tmp_path, JOB_A, "three\n", {"trigger": "interval"})
    assert store.retain(JOB_A, keep=1) == env["cids"]["a"][::-1]
    views_agree(store, JOB_A, now)
    store._mark_bad(JOB_A, cid_new, "test")
    assert store.digest(JOB_A)["checkpoints"][cid_new][3] == "bad"
    views_agree(store, JOB_A, now)
    store.delete(JOB_A, cid_new)
    assert store.digest(JOB_A)["checkpoints"] == {}
    views_agree(store, JOB_A, now)
    store.delete(JOB_A)
    assert store.digest(JOB_A) is None


def test_store_digest_survives_damage_and_lost_updates(env: dict[str, Any], monkeypatch: Any) -> None:
    store, root, now = env["store"], env["root"], env["now"][0]
    key = root / "jobs" / JOB_B / "digest.json"
    key.write_text('{"format": 1, "attem')  # torn by hand: the next update rebuilds it
    assert store.digest(JOB_B) is None
    ev = {**base(JOB_B, 2, "host-z"), "time": T0 + 90000, "event": "start"}
    store.put_event(JOB_B, ev)
    views_agree(store, JOB_B, now)
    assert store.digest(JOB_B)["events"] == 5

    # Another writer puts back an older digest right after ours: the read-back notices, redoes it.
    stale = key.read_bytes()
    real_put = store._backend.put
    clobbered: list[str] = []

    def put(k: str, data: bytes, **kw: Any) -> None:
        real_put(k, data, **kw)
        if k.endswith("digest.json") and not clobbered:
            clobbered.append(k)
            real_put(k, stale)

    monkeypatch.setattr(store._backend, "put", put)
    store.put_event(JOB_B, {**ev, "time": T0 + 90001, "event": "exit", "exit_code": 0})
    assert clobbered and store.digest(JOB_B)["events"] == 6
    views_agree(store, JOB_B, now)


def test_digest_catches_up_after_a_failed_update(env: dict[str, Any], monkeypatch: Any) -> None:
    """An event stored while its digest could not be written is folded in with the next one."""
    store, now = env["store"], env["now"][0]
    real_put = store._backend.put
    failing = [True]

    def put(k: str, data: bytes, **kw: Any) -> None:
        if k.endswith("digest.json") and failing[0]:
            raise StoreError("simulated outage")
        real_put(k, data, **kw)

    monkeypatch.setattr(store._backend, "put", put)
    ev = {**base(JOB_B, 2, "host-y"), "time": T0 + 95000, "event": "start"}
    store.put_event(JOB_B, ev)  # the event is stored, its digest update is not
    assert store.digest(JOB_B)["events"] == 4
    failing[0] = False
    store.put_event(JOB_B, {**ev, "time": T0 + 95001, "event": "exit", "exit_code": 0})
    assert store.digest(JOB_B)["events"] == 6
    views_agree(store, JOB_B, now)


def test_sample_store_views_equal_with_and_without_digests(tmp_path: Path) -> None:
    """The viewer's numbers are the same from digests and from the whole history (the fallback)."""
    write_sample_store(tmp_path / "s", jobs=150, seed=5, now=T0)
    clock = lambda: T0  # noqa: E731

    def answers() -> list[Any]:
        c = make_app(f"file://{tmp_path / 's'}", clock=clock).test_client()
        return [get(c, u) for u in ("/api/v1/overview", "/api/v1/jobs?per_page=500", "/api/v1/series/daily")]

    with_digests = answers()
    removed = [p.unlink() for p in (tmp_path / "s" / "jobs").glob("*/digest.json")]
    assert len(removed) == 150
    assert answers() == with_digests
