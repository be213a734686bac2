"""The README's main job, run as `make demo` runs it, with its result asserted; and the viewer
over the demo's own store, which is where docs/viewer-*.png come from."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mmshim.demo import expected
from mmshim.viewer import make_app
from tests.browser import DOCS, chromium, new_page, no_errors, serving, sync_api

pytestmark = pytest.mark.integration
STEPS = 30


@pytest.fixture(scope="module")
def demo(services_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store = tmp_path_factory.mktemp("demo-store")
    proc = subprocess.run(
        [sys.executable, "-m", "mmshim.demo", "--steps", str(STEPS), "--interval", "2",
         "--keep-store", str(store)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = make_app(f"file://{store}").test_client()
    (job,) = [j["job_id"] for j in client.get("/api/v1/jobs").get_json()["jobs"]]
    return {"out": proc.stdout, "store": store, "job": job, "client": client}


def test_demo_resumes_and_finishes_like_an_uninterrupted_run(demo: dict[str, Any]) -> None:
    out = demo["out"]
    assert "".join(f"    {line}\n" for line in expected(STEPS)) in out
    for event in ("checkpoint.committed", "spot.notice", "restore.succeeded"):
        assert event in out
    assert "[demo] result: same output as an uninterrupted run" in out


def test_viewer_tells_the_demo_story(demo: dict[str, Any]) -> None:
    """Attempt 1 with its checkpoints and the Spot notice, attempt 2 restored, compute kept."""
    client = demo["client"]
    detail = client.get(f"/api/v1/jobs/{demo['job']}").get_json()
    assert [a["mode"] for a in detail["attempts"]] == ["fresh", "restored"]
    assert detail["attempts"][0]["spot_notice"] and detail["attempts"][1]["restored_from"]
    names = [e["event"] for e in detail["events"]]
    assert names.count("checkpoint.committed") >= 2 and "spot.notice" in names
    assert detail["job"]["restored"] and detail["job"]["status"] == "succeeded"
    overview = client.get("/api/v1/overview").get_json()
    assert overview["jobs_restored"] == 1 and overview["restores"]["succeeded"] == 1
    assert overview["compute_hours_kept"] > 0


def test_screenshots_of_the_demo(demo: dict[str, Any]) -> None:
    """docs/viewer-overview.png and docs/viewer-job.png, from the demo's store in Chromium."""
    sync_api()
    job = demo["job"]
    with chromium() as browser, serving(make_app(f"file://{demo['store']}")) as url:
        page = new_page(browser)
        page.goto(url)
        page.wait_for_selector(f"#jobs tbody tr[data-job='{job}']")
        assert "Jobs protected" in page.inner_text("#cards")
        page.wait_for_timeout(500)  # chart animations
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / "viewer-overview.png"), full_page=True)
        page.goto(f"{url}/jobs/{job}")
        page.wait_for_selector("#lanes li")
        lanes = page.locator("#lanes li").all_inner_texts()
        assert len(lanes) == 2 and "restored from" in lanes[1]
        page.wait_for_timeout(500)
        page.screenshot(path=str(DOCS / "viewer-job.png"), full_page=True)
        no_errors(page)
        assert Path(DOCS / "viewer-job.png").stat().st_size > 10_000
