"""The README's main job, run as `make demo` runs it, with its result asserted."""

import subprocess
import sys

import pytest

from mmshim.demo import expected

pytestmark = pytest.mark.integration


def test_demo_resumes_and_finishes_like_an_uninterrupted_run(services_env: dict[str, str], tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mmshim.demo", "--steps", "30", "--interval", "2",
         "--keep-store", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "".join(f"    {line}\n" for line in expected(30)) in out
    for event in ("checkpoint.committed", "spot.notice", "restore.succeeded"):
        assert event in out
    assert "[demo] result: same output as an uninterrupted run" in out

    # The viewer over the demo's store tells the story: attempt 1 with its checkpoints and the
    # Spot notice, attempt 2 restored, compute kept.
    from mmshim.viewer import make_app

    client = make_app(f"file://{tmp_path}").test_client()
    (job,) = [j["job_id"] for j in client.get("/api/v1/jobs").get_json()["jobs"]]
    detail = client.get(f"/api/v1/jobs/{job}").get_json()
    attempts = detail["attempts"]
    assert [a["mode"] for a in attempts] == ["fresh", "restored"]
    names = [e["event"] for e in detail["events"]]
    assert names.count("checkpoint.committed") >= 2 and "spot.notice" in names
    assert detail["job"]["restored"] and detail["job"]["status"] == "succeeded"
