"""End to end in a real browser: tools/serve.py on the tiny synthetic index, driven by Playwright
in Debian's headless chromium (``.ci/run`` installs both).

The page is used as a person would: pick a query in the list, draw its box with the mouse (then
adjust it by dragging a corner), search, and read the result grid. That the first results are
the images holding the instance is checked against the benchmark's relevance.json, not against
anything the server says. Screenshots are saved in the test's output folder (``tmp_path``; also
copied to ``$RETRIEVAL_EXT_SCREENSHOT_DIR`` when set, which is how README's picture is made).

Without chromium or Playwright the tests are skipped, unless ``RETRIEVAL_EXT_REQUIRE_BROWSER=1``
(CI) turns the skip into a failure.
"""

import os
import queue
import re
import shutil
import subprocess
import sys
import threading

import pytest

from tests.common import REPO_ROOT

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
# the machine's network is closed: without these chromium keeps trying to reach Google's hosts
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
]
QUERY = 2  # queries/obj01_1: the instance whose two database images are the clearest
UPLOADED = 3  # queries/obj01_2, sent as an upload


def _browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install -r requirements-dev.txt)")
    if not os.path.isfile(CHROMIUM):
        missing.append(f"chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        why = "browser test needs " + " and ".join(missing)
        if os.environ.get("RETRIEVAL_EXT_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def server(ui_index, tmp_path_factory):
    """tools/serve.py on a free port; yields its base URL."""
    _browser_or_skip()
    out = tmp_path_factory.mktemp("serve")
    cmd = [
        sys.executable,
        str(REPO_ROOT / "tools" / "serve.py"),
        "--port",
        "0",
        "--config-file",
        ui_index.config_file,
        *ui_index.opts,
        "OUTPUT_DIR",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    lines: "queue.Queue[str]" = queue.Queue()
    log = []

    def pump():
        for line in proc.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    try:
        while url is None:
            try:
                line = lines.get(timeout=300)
            except queue.Empty:
                break
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
            if proc.poll() is not None and lines.empty():
                break
        assert url, "server did not start:\n" + "".join(log)[-4000:]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _screenshot(page, path):
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("RETRIEVAL_EXT_SCREENSHOT_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copy(path, os.path.join(target, path.name))


def _screen_point(page, x, y):
    """Screen coordinates of image pixel (x, y) of the query canvas."""
    r = page.locator("#query-canvas").bounding_box()
    s = r["width"] / float(page.locator("#query-canvas").get_attribute("data-image-width"))
    return r["x"] + x * s, r["y"] + y * s


def _drag(page, start, end, steps=8):
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()


def _box_fields(page):
    return [float(page.input_value(f"#box-{n}")) for n in ("x1", "y1", "x2", "y2")]


def _tolerance(page):
    # one screen pixel in image pixels, plus the fields' rounding
    r = page.locator("#query-canvas").bounding_box()
    return float(page.locator("#query-canvas").get_attribute("data-image-width")) / r["width"] + 1


def _draw(page, box):
    """Draw ``box`` (image pixels): a smaller box first, then its corner dragged into place."""
    x1, y1, x2, y2 = box
    mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    _drag(page, _screen_point(page, x1, y1), _screen_point(page, mx, my))
    assert _box_fields(page) == pytest.approx([x1, y1, mx, my], abs=_tolerance(page))
    _drag(page, _screen_point(page, mx, my), _screen_point(page, x2, y2))  # resize the corner
    assert _box_fields(page) == pytest.approx(list(box), abs=_tolerance(page))


def _clear_box(page):
    # a click away from the box (here: the image's top-left pixel) removes it
    page.mouse.click(*_screen_point(page, 1, 1))
    assert page.input_value("#box-x1") == ""


def _hits(page):
    # a thumbnail's frame has its size once its image is decoded (0 px high before: CI saw it)
    page.wait_for_function(
        "[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalHeight > 0)"
    )
    cards = page.locator(".hit")
    out = []
    for i in range(cards.count()):
        card = cards.nth(i)
        frame = card.locator(".framed").bounding_box()
        boxes = card.locator(".box")
        box = boxes.first.bounding_box() if boxes.count() else None
        out.append(
            {
                "image_id": card.get_attribute("data-image-id"),
                "classes": card.get_attribute("class").split(),
                "frame": frame,
                "box": box,
            }
        )
    return out


def _assert_box_drawn_inside(hit):
    b, f = hit["box"], hit["frame"]
    assert b is not None, f"no box drawn on {hit['image_id']}"
    assert b["width"] > 4 and b["height"] > 4, hit
    # inside the thumbnail (the 2 px border may overhang by its width)
    assert b["x"] >= f["x"] - 3 and b["y"] >= f["y"] - 3, hit
    assert b["x"] + b["width"] <= f["x"] + f["width"] + 3, hit
    assert b["y"] + b["height"] <= f["y"] + f["height"] + 3, hit


def _positives(ui_index, obj):
    return {p.rsplit(".", 1)[0] for p in ui_index.relevance[obj]["positives"]}


def test_pick_a_query_draw_its_box_and_find_the_instance(browser, server, ui_index, tmp_path):
    query = ui_index.queries[QUERY]
    image_id = query["image"].rsplit(".", 1)[0]
    positives = _positives(ui_index, query["object"])
    assert len(positives) == 2
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server)
    page.click("#tab-query")
    page.click(f".thumb[data-image-id='{image_id}']")
    page.wait_for_selector("#query-canvas[data-ready='1']")
    # the dataset's own box is preloaded; replace it by one drawn with the mouse
    assert _box_fields(page) == pytest.approx(query["box"], abs=1)
    _clear_box(page)
    _draw(page, query["box"])
    # default stages: filtering, CA-SR, query expansion
    assert page.is_checked("input[name=rerank][value=ca_sr]") and page.is_checked("#qe")
    page.click("#search")
    page.wait_for_selector(".hit")
    hits = _hits(page)
    assert len(hits) == 12  # "shown" defaults to 24; the index has 12 images
    first = hits[: len(positives)]
    assert {h["image_id"] for h in first} == positives
    for h in first:
        _assert_box_drawn_inside(h)
        assert "relevant" in h["classes"]
    assert all("nonrelevant" in h["classes"] for h in hits[len(positives) :])
    summary = page.text_content("#summary")
    assert f'ground truth: "{query["object"]}"' in summary and "AP 100.0%" in summary
    stages = page.locator("#latency tbody td:first-child").all_text_contents()
    assert stages == ["query extraction (network)", "filtering", "CA-SR", "CA-SR + QE"]
    _screenshot(page, tmp_path / "serve_results.png")

    # a click on a result shows it large, with its box
    page.locator(".hit").first.click()
    page.wait_for_selector("#viewer:not([hidden])")
    page.wait_for_function("document.getElementById('viewer-image').complete")
    big = page.locator("#viewer-frame .box").bounding_box()
    assert big["width"] > hits[0]["box"]["width"]
    _screenshot(page, tmp_path / "serve_viewer.png")
    page.keyboard.press("Escape")
    assert page.locator("#viewer").is_hidden()

    # the located object of a result becomes the next query
    page.locator(".hit").first.click()
    caption = page.text_content("#viewer-caption")
    located = [float(v) for v in re.search(r"located at \[([^\]]+)\]", caption).group(1).split(",")]
    page.click("#viewer-search")
    page.wait_for_function(
        f"document.getElementById('query-title').textContent.includes('{hits[0]['image_id']}')"
    )
    page.wait_for_function("!document.getElementById('summary').textContent.includes('searching')")
    assert _box_fields(page) == pytest.approx(located, abs=0.51)  # the fields show whole pixels
    again = _hits(page)
    # a database image queried with a region of its own: it is among the first results
    assert hits[0]["image_id"] in [h["image_id"] for h in again[:3]]
    page.close()


def test_upload_a_query_and_rank_by_filtering_only(browser, server, ui_index, tmp_path):
    query = ui_index.queries[UPLOADED]
    positives = _positives(ui_index, query["object"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server)
    page.click("#tab-upload")
    page.set_input_files("#upload-file", str(ui_index.root / query["image"]))
    page.wait_for_selector("#query-canvas[data-ready='1']")
    assert page.input_value("#box-x1") == ""  # an upload has no box until one is drawn
    _draw(page, query["box"])
    page.check("input[name=rerank][value=none]")
    page.uncheck("#qe")
    page.click("#search")
    page.wait_for_selector(".hit")
    hits = _hits(page)
    assert {h["image_id"] for h in hits[: len(positives)]} == positives
    # filtering ranks whole images: nothing is located, and an upload has no ground truth
    assert all(h["box"] is None for h in hits)
    assert page.locator("#latency tbody tr").count() == 2  # extraction, filtering
    assert "AP" not in page.text_content("#summary")
    _screenshot(page, tmp_path / "serve_upload.png")
    page.close()


def test_bad_upload_shows_the_servers_message(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server)
    page.click("#tab-upload")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    page.set_input_files("#upload-file", str(bad))
    page.wait_for_function("document.getElementById('message').textContent.length > 0")
    assert "notes.jpg" in page.text_content("#message")
    page.close()
