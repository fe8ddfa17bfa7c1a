"""The operator's monitor in a real headless Chromium (Debian ``chromium`` driven by Playwright).

The demo runs as a child process (camera bridge on the bundled frames, daemon on the tiny test bundle, monitor)
on random loopback ports; the page must show a frame with boxes. Then the demo is stopped (Ctrl-C, exit 0) and
a monitor serves its database: confirming and reclassifying in the review queue change the database and the
counts on the page; the report lists every cell of the slide. Screenshots are kept in each test's tmp_path.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                                 "(apt-get install -y chromium)")]
TIMEOUT_MS = 90_000  # generous: the CPU may be shared with training; a failure is a missing box, not slowness
TOKEN = "browser-test-token-0123456789"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def demo(tiny_bundle, tmp_path_factory):
    """``cytoedge demo`` running as a child process -> dict(proc, url, db, lines). Killed in teardown."""
    tmp = tmp_path_factory.mktemp("demo")
    port = _free_port()
    cmd = [sys.executable, "-m", "edge.cli", "demo", "--bundle", str(tiny_bundle), "--port", str(port),
           "--frames", f"tcp://127.0.0.1:{_free_port()}", "--flags", f"tcp://127.0.0.1:{_free_port()}",
           "--metrics-port", "-1", "--db", str(tmp / "demo.db"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen = []
    end = time.monotonic() + 60
    url = None
    while url is None and time.monotonic() < end and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if "open http://" in line:
            url = line.split("open ", 1)[1].split()[0]
    try:
        assert url == f"http://127.0.0.1:{port}/", "demo did not print its URL:\n" + "".join(seen)
        yield {"proc": proc, "url": url, "db": tmp / "demo.db", "dir": tmp}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_live_page_shows_frame_with_boxes(demo, page):
    page.goto(demo["url"])
    page.wait_for_function("Number(document.getElementById('frame').dataset.boxes) > 0")
    # the review queue's crops are real images served by /api/crop, loaded before the screenshot is taken
    page.wait_for_function("(() => { const im = Array.from(document.querySelectorAll('#queue img'));"
                           " return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0); })()")
    page.wait_for_timeout(500)  # let the next frames paint, for a representative screenshot
    shot = demo["dir"] / "monitor-live.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    canvas = page.locator("#frame")
    assert canvas.get_attribute("data-slide") == "DEMO-001" and int(canvas.get_attribute("data-seq")) >= 0
    assert page.locator("#st-daemon").get_attribute("class") == "pill up"
    assert page.locator("#slide-id").text_content() == "DEMO-001"
    page.wait_for_function("Number(document.getElementById('diff').dataset.total) > 0")
    print(f"screenshot: {shot}")


@pytest.fixture(scope="module")
def demo_db(demo, tiny_bundle):
    """Let the demo store some cells to review, stop it with Ctrl-C (exit 0) -> (db path, classes)."""
    from edge.bundle import load_bundle
    from edge.storage import connect, review_queue, slide_cells

    end = time.monotonic() + 180
    n_review = n_cells = 0
    while time.monotonic() < end and demo["proc"].poll() is None:
        if demo["db"].exists():
            conn = connect(demo["db"], readonly=True)
            n_review, n_cells = len(review_queue(conn, "DEMO-001")), len(slide_cells(conn, "DEMO-001"))
            conn.close()
            if n_review >= 3 and n_cells >= 5:
                break
        time.sleep(0.5)
    assert n_review >= 3, f"the demo stored only {n_cells} cells, {n_review} for review"
    demo["proc"].send_signal(signal.SIGINT)
    assert demo["proc"].wait(60) == 0
    return demo["db"], load_bundle(tiny_bundle).classes


@pytest.fixture
def monitor(demo_db):
    """A monitor on the stopped demo's database (no live feed: the queue and the counts hold still)."""
    from edge.monitor import Monitor, MonitorConfig

    db, classes = demo_db
    ctx = zmq.Context()
    mon = Monitor(MonitorConfig(port=0, frames=f"tcp://127.0.0.1:{_free_port()}", flags=f"tcp://127.0.0.1:{_free_port()}",
                                db=str(db)), classes, context=ctx).start()
    yield mon
    mon.stop()
    ctx.term()


def _decisions(db) -> list[tuple]:
    from edge.storage import connect

    conn = connect(db, readonly=True)
    rows = [tuple(r) for r in conn.execute("SELECT cell_id, operator, decision, label FROM decisions ORDER BY id")]
    conn.close()
    return rows


def _row_n(page, label) -> int:
    loc = page.locator(f"#diff tr[data-class='{label}'] td.n")
    return int(loc.text_content()) if loc.count() else 0


def test_confirm_and_reclassify_update_db_and_counts(monitor, demo_db, page, tmp_path):
    db, classes = demo_db
    page.goto(monitor.url)
    page.wait_for_selector("#queue .card")
    page.fill("#operator", "Dr Test")
    page.dispatch_event("#operator", "change")
    before = _decisions(db)
    pending0 = int(page.locator("#diff").get_attribute("data-pending"))
    cards = page.locator("#queue .card")
    n_cards = cards.count()
    assert n_cards >= 3 and pending0 >= n_cards

    # confirm the first card
    first = cards.nth(0)
    cid = first.get_attribute("data-cell-id")
    label = first.locator("button.confirm").text_content().removeprefix("Confirm ").strip()
    first.locator("button.confirm").click()
    page.wait_for_selector(f"#queue .card[data-cell-id='{cid}']", state="detached")
    page.wait_for_function(f"Number(document.getElementById('diff').dataset.pending) === {pending0 - 1}")
    assert _decisions(db)[len(before):] == [(cid, "Dr Test", "confirm", label)]

    # reclassify the next card as a neutrophil: the neutrophil count goes up by one
    neut0 = _row_n(page, "neutrophil")
    second = page.locator("#queue .card").nth(0)
    cid2 = second.get_attribute("data-cell-id")
    second.locator("select.relabel").select_option("neutrophil")
    # a queue refresh (a "review" event: new cells, another operator's decision) between picking and clicking
    # must not reset the pick (it did: CI caught a reclassification sent with the menu's default label)
    page.evaluate("loadReview()")
    assert page.locator(f"#queue .card[data-cell-id='{cid2}'] select.relabel").input_value() == "neutrophil"
    second.locator("button.reclassify").click()
    page.wait_for_selector(f"#queue .card[data-cell-id='{cid2}']", state="detached")
    page.wait_for_function("Number(document.querySelector(\"#diff tr[data-class='neutrophil'] td.n\").textContent) === "
                           f"{neut0 + 1}")
    assert _decisions(db)[len(before):] == [(cid, "Dr Test", "confirm", label), (cid2, "Dr Test", "reclassify", "neutrophil")]
    assert int(page.locator("#diff").get_attribute("data-pending")) == pending0 - 2
    assert page.locator("#queue .card").count() == n_cards - 2
    page.screenshot(path=str(tmp_path / "monitor-review.png"), full_page=True)

    # the page agrees with the database after a reload
    page.reload()
    page.wait_for_selector("#queue .card")
    assert _row_n(page, "neutrophil") == neut0 + 1


def test_report_lists_every_cell_of_the_slide(monitor, demo_db, page, tmp_path):
    from edge.storage import connect, slide_cells

    db, _ = demo_db
    conn = connect(db, readonly=True)
    ids = {c["id"] for c in slide_cells(conn, "DEMO-001")}
    bundle_ids = {c["bundle_id"] for c in slide_cells(conn, "DEMO-001")}
    conn.close()
    page.goto(monitor.url + "report?slide=DEMO-001")
    rows = page.locator("table.cells tr[data-cell-id]")
    assert {rows.nth(i).get_attribute("data-cell-id") for i in range(rows.count())} == ids
    assert all(b in page.content() for b in bundle_ids)
    assert page.locator("h1").text_content() == "Differential report: slide DEMO-001"
    flagged = page.locator(".flagged .fcell img")
    assert flagged.count() >= 1
    page.wait_for_function("[...document.querySelectorAll('.flagged img')].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    with page.expect_download() as dl:
        page.evaluate("document.getElementById('csv').click()")
    csv_path = tmp_path / "report.csv"
    dl.value.save_as(csv_path)
    cell_rows = [line for line in csv_path.read_text().splitlines() if line.startswith("cell,")]
    assert len(cell_rows) == len(ids)


def test_non_loopback_monitor_needs_its_token(demo_db, page, tmp_path):
    """Bound to every interface: refused outright without a token; with one, 401 without it, the page with it."""
    from edge.monitor import Monitor, MonitorConfig

    db, classes = demo_db
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "edge.cli", "monitor", "--host", "0.0.0.0", "--port", str(port),
                        "--db", str(db)], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "CYTOEDGE_MONITOR_TOKEN"})
    assert r.returncode == 2 and "needs an access token" in r.stderr
    ctx = zmq.Context()
    mon = Monitor(MonitorConfig(host="0.0.0.0", port=0, token=TOKEN, frames=f"tcp://127.0.0.1:{_free_port()}",
                                flags=f"tcp://127.0.0.1:{_free_port()}", db=str(db)), classes, context=ctx).start()
    try:
        base = f"http://127.0.0.1:{mon.port}/"
        resp = page.goto(base)
        assert resp.status == 401 and "access token" in page.content()
        assert page.goto(base + "api/state").status == 401
        resp = page.goto(base + f"?token={TOKEN}")
        assert resp.status == 200
        page.wait_for_selector("#queue .card")  # the API and the event stream work through the cookie
        page.screenshot(path=str(tmp_path / "token.png"))
        assert json.loads(page.goto(base + "api/state").text())["slide"] == "DEMO-001"
    finally:
        mon.stop()
        ctx.term()
