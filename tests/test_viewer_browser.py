"""The viewer's pages in a real headless Chromium (Debian's), driven by Playwright, over a
generated store plus three known jobs. (The screenshots in docs/ are taken over the demo's own
store, by tests/integration/test_demo.py.)
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from mmshim.store import open_store
from mmshim.viewer import make_app, write_sample_store
from tests.browser import chromium, new_page, no_errors, serving, sync_api, wait_until
from tests.test_viewer import JOB_A, JOB_C, fill_store

sync_api()  # skips the module without a browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("viewer-browser")
    root = tmp / "store"
    write_sample_store(root, jobs=300, seed=3)  # a busy-looking overview
    store = open_store(f"file://{root}", chunk_size=4096)
    cids = fill_store(store, tmp)  # plus the known jobs (their events are older: page 1 is sample jobs)
    with serving(make_app(f"file://{root}", token="browser-token")) as url:
        yield {"url": url, "cids": cids, "tmp": tmp}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any, server: dict[str, Any]) -> Iterator[Any]:
    pg = new_page(browser)
    pg.goto(f"{server['url']}/?token=browser-token")  # sets the cookie for the rest of the context
    yield pg
    pg.context.close()


def test_overview(page: Any, server: dict[str, Any]) -> None:
    page.wait_for_selector("#cards .card")
    page.wait_for_selector("#jobs tbody tr[data-job]")
    cards = page.inner_text("#cards")
    assert "Jobs protected" in cards and "Restores" in cards and "Saved vs on-demand" in cards
    assert page.locator("#jobs tbody tr[data-job]").count() == 50
    # the server's first load publishes 250 jobs at a time; the page reloads its table until done
    wait_until(page, lambda: "303 jobs" in page.inner_text("#pager"))

    # charts were drawn (ECharts instances with data; the series arrive after the table)
    def points() -> list[int]:
        return page.evaluate(
            "['chart-size','chart-duration','chart-restores','chart-cost'].map(id => "
            "(echarts.getInstanceByDom(document.getElementById(id)).getOption().series[0].data || []).length)"
        )

    wait_until(page, lambda: all(x > 0 for x in points()))
    page.select_option("select[name=status]", "failed")
    wait_until(page, lambda: "303 jobs" not in page.inner_text("#pager"))
    statuses = page.locator("#jobs tbody tr[data-job] .status").all_inner_texts()
    assert statuses and set(statuses) == {"failed"}
    page.select_option("select[name=status]", "")
    page.fill("input[name=q]", JOB_C)
    page.wait_for_selector(f"#jobs tbody tr[data-job='{JOB_C}']")
    page.fill("input[name=q]", "")
    page.click("#jobs th[data-sort=job_id]")

    def ids() -> list[str]:
        return page.locator("#jobs tbody tr[data-job]").evaluate_all("rs => rs.map(r => r.dataset.job)")

    wait_until(page, lambda: ids() == sorted(ids()) and len(ids()) == 50)
    no_errors(page)


def test_job_page_timeline_and_bundle(page: Any, server: dict[str, Any]) -> None:
    page.goto(f"{server['url']}/jobs/{JOB_A}")
    page.wait_for_selector("#lanes li")
    assert page.inner_text("#job-title") == JOB_A
    assert page.inner_text("#job-status") == "succeeded"
    lanes = page.locator("#lanes li").all_inner_texts()
    assert len(lanes) == 2
    assert "host-a" in lanes[0] and "reclaimed" in lanes[0]
    assert "host-b" in lanes[1] and "restored from" in lanes[1] and "succeeded" in lanes[1]
    opt = page.evaluate(
        "(() => { const o = echarts.getInstanceByDom(document.getElementById('timeline')).getOption();"
        " return {lanes: o.yAxis[0].data,"
        " series: Object.fromEntries(o.series.map(s => [s.name, s.data.length]))}; })()"
    )
    assert opt["lanes"] == ["#1 host-a", "#2 host-b"]
    assert opt["series"]["runs"] == 2 and opt["series"]["checkpoint"] == 2
    assert (
        opt["series"]["restore"] == 1 and opt["series"]["spot notice"] == 1 and opt["series"]["reclaim"] == 1
    )
    # hovering a checkpoint shows its size and duration
    box = page.locator("#timeline").bounding_box()
    pos = page.evaluate(
        "(() => { const c = echarts.getInstanceByDom(document.getElementById('timeline'));"
        " const s = c.getOption().series.find(s => s.name === 'checkpoint');"
        " return c.convertToPixel({seriesName: 'checkpoint'}, s.data[0].value); })()"
    )
    page.mouse.move(box["x"] + pos[0], box["y"] + pos[1])
    wait_until(page, lambda: "frozen" in page.inner_text("body"))
    assert page.locator("#checkpoints tbody tr[data-checkpoint]").count() == 2
    assert page.locator("#events tbody tr").count() == 10
    with page.expect_download() as dl:
        page.click("#bundle")
    path = server["tmp"] / "bundle.tar.gz"
    dl.value.save_as(path)
    with tarfile.open(path, "r:gz") as tar:
        names = set(tar.getnames())
        cid1, cid2 = server["cids"]["a"]
        assert f"{JOB_A}/events.json" in names
        assert f"{JOB_A}/checkpoints/{cid1}/logs/dump.log" in names
        assert f"{JOB_A}/checkpoints/{cid2}/checkpoint.json" in names
        assert tar.extractfile(f"{JOB_A}/checkpoints/{cid2}/logs/dump.log").read() == b"dump two <b>ok</b>\n"  # type: ignore[union-attr]
    no_errors(page)


def test_fallback_reason_is_text_not_html(page: Any, server: dict[str, Any]) -> None:
    page.goto(f"{server['url']}/jobs/{JOB_C}")
    page.wait_for_selector("#lanes li")
    assert "<script>alert(1)</script>" in page.inner_text("#lanes")
    assert page.evaluate("document.querySelectorAll('main script').length") == 0
    no_errors(page)


def test_bad_job_id_404_page(page: Any, server: dict[str, Any]) -> None:
    for bad in ("no-such-job", "..%2F..%2Fetc%2Fpasswd"):
        resp = page.goto(f"{server['url']}/jobs/{bad}")
        assert resp.status == 404
        assert "404" in page.inner_text("h1") and "no such job" in page.inner_text("main").lower()
    # the page itself loads cleanly; the only console error is Chromium's note about the 404 itself
    no_errors(page, allow_404=True)
