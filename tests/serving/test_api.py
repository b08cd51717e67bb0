"""The browser UI's JSON API (retrieval_ext.serving.app), endpoint by endpoint, through TestClient.

The service runs on the session's tiny synthetic index (see conftest.py). Every expected value is
read from the collection itself: image sizes with PIL, counts from the folder and queries.json,
relevance marks and ground truth from relevance.json, AP with the Oxford protocol written out
here, rankings from the Python API (InstanceSearch) called directly.
"""

import asyncio
import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

import retrieval_ext
from retrieval_ext import InstanceSearch
from retrieval_ext.data.datasets.catalog import get_dataset_dicts
from retrieval_ext.serving.app import create_app
from retrieval_ext.serving.service import SearchService
from tests.common import make_cfg, save_checkpoint, written_out_ap

NON_CS_STAGES = ["filtering", "filtering_qe", "ca_sr", "ca_sr_qe"]
CHAIN = ["filtering", "ca_sr", "ca_sr_qe"]  # what ca_sr_qe builds on, in order
STATIC = Path(retrieval_ext.__file__).parent / "serving" / "static"
SMALL_BYTES = 1000  # limits of the second service, the one that tests refusals
SMALL_PIXELS = 100 * 100
SMALL_UPLOADS = 2


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(ui_index):
    return InstanceSearch(ui_index.cfg)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(SearchService(engine))) as c:
        yield c


@pytest.fixture(scope="module")
def small_client(engine):
    """A service over the same engine with tiny upload limits (no second model load)."""
    service = SearchService(
        engine,
        max_upload_bytes=SMALL_BYTES,
        max_upload_pixels=SMALL_PIXELS,
        max_uploads=SMALL_UPLOADS,
    )
    with TestClient(create_app(service)) as c:
        yield c


def test_the_query_set_classifier_gives_the_api_cs_sr(ui_index):
    """With RETRIEVAL.CS_SR_CLASSIFIER "queries" the dataset's query objects are the classes:
    an off-the-shelf index offers CS-SR, and a query of object c ranks by the probability of c."""
    opts = ui_index.opts + ["RETRIEVAL.CS_SR_CLASSIFIER", "queries"]
    engine = InstanceSearch(make_cfg(ui_index.config_file, opts))
    assert engine.searcher.num_classes == 3  # the benchmark's 3 objects
    q = get_dataset_dicts(f"{ui_index.cfg.RETRIEVAL.DATASET}_query")[0]
    record = engine.query_record(q["file_name"], q["query_box"])
    hits = engine.search_record(record, "cs_sr", top_k=6, class_id=q["category_id"])
    scores = [h.score for h in hits]
    assert len(scores) == 6 and all(0 <= s <= 1 for s in scores)
    assert scores == sorted(scores, reverse=True)


def test_the_python_api_loads_the_whitening_learned_beside_its_index(engine, ui_index):
    """RETRIEVAL.INDEX_DIR is set (tmp/index, OUTPUT_DIR tmp/out): indexing learned the whitening
    in the index's parent folder, and the API uses that one instead of indexing the whitening
    dataset and learning it again under OUTPUT_DIR."""
    from retrieval_ext.retrieval.normalization import PCAWhitening

    from .conftest import WHITEN

    beside = Path(ui_index.cfg.RETRIEVAL.INDEX_DIR).parent
    (saved,) = beside.glob(f"whitening-{WHITEN}-*.npz")
    expected = PCAWhitening.load(saved)
    np.testing.assert_array_equal(engine.searcher.whitening.projection, expected.projection)
    np.testing.assert_array_equal(engine.searcher.whitening.mean, expected.mean)
    out = Path(ui_index.cfg.OUTPUT_DIR)
    assert not list(out.glob("whitening-*")) and not (out / f"index-{WHITEN}").exists()


@pytest.fixture(scope="module")
def db_files(ui_index):
    """{image_id: path} of the database images, from the folder."""
    files = sorted((ui_index.root / "images").iterdir())
    return {f"images/{p.stem}": p for p in files if p.is_file()}


@pytest.fixture(scope="module")
def db_ids(client):
    """{image_id: id} as the API addresses database images."""
    items = client.get("/api/images", params={"source": "db", "limit": 1000}).json()["items"]
    return {it["image_id"]: it["id"] for it in items}


# -- helpers -------------------------------------------------------------------------------------
def _pil_size(path):
    """(width, height) of an image file as displayed (EXIF orientation applied)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


def _pixels(data_or_path):
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float64)


def _encode(image, fmt):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _test_image(w, h, mode="RGB", seed=0):
    """A smooth random image (compresses well, decodes close to itself after JPEG); RGBA ones
    get an alpha ramp from transparent (left) to opaque (right)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    if mode == "RGBA":
        alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
        img.putalpha(Image.fromarray(alpha, "L"))
    if mode == "P":  # a 64-colour palette, undithered (dithering is noise that JPEG smooths away)
        return img.quantize(64, dither=Image.Dither.NONE)
    return img.convert(mode)


def _solid_png(w, h):
    """A one-colour PNG: a few hundred bytes whatever its size."""
    return _encode(Image.new("RGB", (w, h), (20, 180, 90)), "PNG")


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _opt(ui_index, key):
    return ui_index.opts[ui_index.opts.index(key) + 1]


def _search(client, **body):
    r = client.post("/api/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _query_body(ui_index, q, **extra):
    return dict(source="query", id=q, box=ui_index.queries[q]["box"], **extra)


def _rel(image_id, db_files):
    """relevance.json's name of a database image ("images/db_00003.jpg")."""
    return f"images/{db_files[image_id].name}"


def _asgi_get(app, path):
    """GET ``path`` straight into the ASGI app, unnormalised (an HTTP client would resolve '..'
    before sending; a hostile one need not). Returns (status, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


# -- page and static files -----------------------------------------------------------------------
def test_page_and_static_files_are_served(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"></script>' in r.text
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200, name
        assert kind in r.headers["content-type"]
        assert r.content == (STATIC / name).read_bytes()


# distinctive text of files a traversal would reach: the repository's setup.py, this package's
# app.py (one level above static/), the system's password file
_SECRETS = ["find_packages", "def create_app", "root:x:"]


@pytest.mark.parametrize(
    "path",
    [
        "/static/../setup.py",
        "/static/%2e%2e/setup.py",
        "/static/%2e%2e/app.py",
        "/static/..%2Fapp.py",
        "/static/..%2F..%2F..%2Fsetup.py",
        "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fsetup.py",
        "/static//etc/passwd",
        "/static/%2Fetc%2Fpasswd",
        "/api/image/db/..%2F..%2Fsetup.py",
        "/api/image/../../etc/passwd",
        "/api/image/query/..%2F..%2F..%2Fsetup.py",
        "/api/image/upload/..%2F..%2Fsetup.py",
    ],
)
def test_path_traversal_through_the_client_is_refused(client, path):
    r = client.get(path)
    assert r.status_code in (400, 404, 422), (path, r.status_code)
    for text in _SECRETS:
        assert text not in r.text, path


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/../../../setup.py",
        "/static/../../../../../../../../etc/passwd",
        "/static//etc/passwd",
        "/static/./../app.py",
        "/static/..\\..\\..\\setup.py",
        "/api/image/../../etc/passwd",
        "/api/image/db/../../setup.py",
    ],
)
def test_path_traversal_sent_raw_is_refused(client, path):
    """'..' segments that reach the app unresolved (as a raw request line would carry them)."""
    status, body = _asgi_get(client.app, path)
    assert status in (400, 404, 422), (path, status)
    for text in _SECRETS:
        assert text.encode() not in body, path


# -- /api/info -----------------------------------------------------------------------------------
def test_info_counts_stages_and_parameters(client, ui_index, db_files):
    info = client.get("/api/info").json()
    assert info["dataset"] == "ui_synth"
    assert info["num_images"] == len(db_files) == 12
    assert info["num_queries"] == len(ui_index.queries) == 6
    # a model not fine-tuned on the objects: no class-specific reranking, no class names offered
    assert info["stages"] == NON_CS_STAGES
    assert info["class_names"] == []
    assert info["default_stage"] in info["stages"]
    assert info["top_n"] == int(_opt(ui_index, "RETRIEVAL.TOP_N")) == 6
    assert info["qe_m"] == int(_opt(ui_index, "RETRIEVAL.QE_M")) == 2
    assert info["has_ground_truth"] is True
    assert info["max_top_k"] == 500
    assert info["max_upload_bytes"] == 20 * 2**20


# -- /api/images ---------------------------------------------------------------------------------
def test_images_db_lists_every_image_with_its_size(client, db_files):
    r = client.get("/api/images", params={"source": "db"})
    assert r.status_code == 200
    page = r.json()
    assert page["total"] == len(db_files)
    items = page["items"]
    assert [it["id"] for it in items] == list(range(len(db_files)))
    assert sorted(it["image_id"] for it in items) == sorted(db_files)
    for it in items:
        assert it["source"] == "db"
        assert (it["width"], it["height"]) == _pil_size(db_files[it["image_id"]]), it
        assert "box" not in it and "object" not in it


def test_images_db_ids_address_the_listed_files(client, db_files):
    """/api/image/db/{id} serves the very file the listing names: its pixels are closer to that
    file than to any other database image (JPEG re-encoding only adds a little noise)."""
    items = client.get("/api/images", params={"source": "db"}).json()["items"]
    originals = {k: _pixels(p) for k, p in db_files.items()}
    for it in items:
        served = _pixels(client.get(f"/api/image/db/{it['id']}").content)
        diffs = {
            k: np.abs(served - a).mean() for k, a in originals.items() if a.shape == served.shape
        }
        own = diffs.pop(it["image_id"])
        assert own < 8.0 and all(own < d / 2 for d in diffs.values()), (it, own, diffs)


def test_images_query_items_match_queries_json(client, ui_index):
    page = client.get("/api/images", params={"source": "query"}).json()
    assert page["total"] == len(ui_index.queries)
    for q, (it, entry) in enumerate(zip(page["items"], ui_index.queries)):
        assert it["source"] == "query" and it["id"] == q
        assert it["image_id"] == entry["image"].rsplit(".", 1)[0]
        assert it["box"] == pytest.approx(entry["box"])
        assert it["object"] == entry["object"]
        assert (it["width"], it["height"]) == _pil_size(ui_index.root / entry["image"])


@pytest.mark.parametrize("needle", ["db_0001", "DB_0000", "00011", "images/", "zzz", " db_0000 "])
def test_images_db_filter_by_substring(client, db_files, needle):
    page = client.get("/api/images", params={"source": "db", "q": needle}).json()
    key = needle.strip().lower()
    expected = sorted(i for i in db_files if key in i.lower())
    assert page["total"] == len(expected)
    assert sorted(it["image_id"] for it in page["items"]) == expected


def test_images_query_filter_matches_object_or_image(client, ui_index):
    obj = ui_index.queries[0]["object"]
    for needle in [obj, obj.upper(), "_2"]:
        page = client.get("/api/images", params={"source": "query", "q": needle}).json()
        k = needle.lower()
        expected = [
            q
            for q, e in enumerate(ui_index.queries)
            if k in e["image"].rsplit(".", 1)[0].lower() or k in e["object"].lower()
        ]
        assert expected  # the needle is meant to match something
        assert [it["id"] for it in page["items"]] == expected
        assert page["total"] == len(expected)


@pytest.mark.parametrize("offset,limit", [(0, 5), (5, 4), (10, 5), (11, 1), (12, 3), (40, 60)])
def test_images_paging(client, db_files, offset, limit):
    page = client.get(
        "/api/images", params={"source": "db", "offset": offset, "limit": limit}
    ).json()
    assert page["total"] == len(db_files)
    assert [it["id"] for it in page["items"]] == list(range(len(db_files)))[offset:][:limit]


@pytest.mark.parametrize(
    "params,status,mentions",
    [
        ({"source": "nope"}, 400, "'nope'"),
        ({"source": "upload"}, 400, "'upload'"),
        ({"source": "db", "limit": 0}, 400, "limit"),
        ({"source": "db", "limit": 5000}, 400, "limit"),
        ({"source": "db", "offset": -1}, 400, "offset"),
        ({"source": "db", "offset": "abc"}, 422, None),
        ({"source": "db", "limit": "1.5"}, 422, None),
        ({"source": "db", "q": "x" * 201}, 422, None),
    ],
)
def test_images_bad_requests(client, params, status, mentions):
    r = client.get("/api/images", params=params)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    if mentions:
        assert mentions in r.json()["detail"]


# -- /api/image ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source,ident", [("db", 0), ("db", 11), ("query", 0), ("query", 5)])
def test_image_is_jpeg_of_the_right_size(client, ui_index, db_files, db_ids, source, ident):
    if source == "db":
        path = db_files[next(k for k, v in db_ids.items() if v == ident)]
    else:
        path = ui_index.root / ui_index.queries[ident]["image"]
    w, h = _pil_size(path)
    longer = max(w, h)
    for size, expected_longer in [(0, longer), (longer, longer), (4096, longer), (64, 64)]:
        r = client.get(f"/api/image/{source}/{ident}", params={"size": size})
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/jpeg"
        assert r.content[:3] == b"\xff\xd8\xff"
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == "JPEG"
            got_w, got_h = im.size
        assert max(got_w, got_h) == expected_longer, (size, im.size)
        # aspect kept: the shorter side scaled by the same factor, to the nearest pixel
        s = expected_longer / longer
        assert abs(got_w - w * s) <= 1 and abs(got_h - h * s) <= 1, (size, im.size, (w, h))
    # without size: the full image
    with Image.open(io.BytesIO(client.get(f"/api/image/{source}/{ident}").content)) as im:
        assert im.size == (w, h)


@pytest.mark.parametrize(
    "url,status,mentions",
    [
        ("/api/image/db/12", 404, "12"),
        ("/api/image/db/-1", 404, "-1"),
        ("/api/image/db/99999999999999999999", 404, "99999999999999999999"),
        ("/api/image/query/6", 404, "6"),
        ("/api/image/nope/0", 404, "nope"),
        ("/api/image/upload/0123456789abcdef", 404, "0123456789abcdef"),
        ("/api/image/db/abc", 400, "abc"),
        ("/api/image/db/1.5", 400, "1.5"),
        ("/api/image/query/x", 400, "x"),
        ("/api/image/db/0?size=99999", 400, "99999"),
        ("/api/image/db/0?size=4097", 400, "4097"),
        ("/api/image/db/0?size=-1", 400, "-1"),
        ("/api/image/db/0?size=big", 422, None),
    ],
)
def test_image_bad_requests(client, url, status, mentions):
    r = client.get(url)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    if mentions:
        assert mentions in r.json()["detail"]


# -- /api/upload ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "L"), ("PNG", "P")]
)
def test_upload_image_then_serve_it(client, fmt, mode):
    img = _test_image(83, 51, mode=mode, seed=1)
    data = _encode(img, fmt)
    r = client.post("/api/upload", content=data, headers={"X-Filename": f"photo.{fmt.lower()}"})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["source"] == "upload"
    assert isinstance(up["id"], str) and up["id"]
    assert (up["width"], up["height"]) == (83, 51)
    r = client.get(f"/api/image/upload/{up['id']}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["cache-control"] == "no-store"  # uploads die with the process
    served = _pixels(r.content)
    assert served.shape == (51, 83, 3)
    # the same picture (up to JPEG noise); transparency composited over white, written out here
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    expected = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    assert np.abs(served - expected).mean() < 8.0  # another picture differs by ~50
    r = client.get(f"/api/image/upload/{up['id']}", params={"size": 40})
    with Image.open(io.BytesIO(r.content)) as im:
        assert max(im.size) == 40


def test_upload_tokens_are_distinct(client):
    data = _encode(_test_image(20, 20), "PNG")
    ids = {client.post("/api/upload", content=data).json()["id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize(
    "data,name",
    [
        (b"this is not an image, only text\n" * 4, "notes.txt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "broken.png"),
        (b"", "empty.jpg"),
        (None, "truncated.jpg"),  # the first half of a real JPEG
    ],
)
def test_upload_refuses_what_is_not_an_image(client, data, name):
    if data is None:
        full = _encode(_test_image(120, 90, seed=2), "JPEG")
        data = full[: len(full) // 2]
    r = client.post("/api/upload", content=data, headers={"X-Filename": name})
    assert r.status_code == 400, r.text
    assert name in r.json()["detail"]


def test_upload_without_filename_is_named_in_the_message(client):
    r = client.post("/api/upload", content=b"garbage")
    assert r.status_code == 400
    assert "upload" in r.json()["detail"]


def _padded_png(total_bytes, w=10, h=10):
    # PIL stops reading a PNG at IEND: trailing bytes make a valid image of any size
    data = _encode(_test_image(w, h), "PNG")
    assert len(data) <= total_bytes
    return data + b"\x00" * (total_bytes - len(data))


def test_upload_byte_limit(small_client):
    ok = small_client.post("/api/upload", content=_padded_png(SMALL_BYTES))
    assert ok.status_code == 200, ok.text  # exactly the limit is allowed
    r = small_client.post(
        "/api/upload", content=_padded_png(SMALL_BYTES + 1), headers={"X-Filename": "big.png"}
    )
    assert r.status_code == 413, r.text
    assert "big.png" in r.json()["detail"] and str(SMALL_BYTES) in r.json()["detail"]


def test_upload_byte_limit_without_content_length(small_client):
    """A chunked body (no Content-Length to check first) is cut off once it passes the limit."""

    def chunks():
        for _ in range(4):
            yield b"\x00" * 400

    r = small_client.post("/api/upload", content=chunks(), headers={"X-Filename": "stream.bin"})
    assert r.status_code == 413, r.text
    assert "stream.bin" in r.json()["detail"]


def test_upload_pixel_limit(small_client):
    side = math.isqrt(SMALL_PIXELS)
    ok = small_client.post("/api/upload", content=_solid_png(side, side))
    assert ok.status_code == 200, ok.text  # exactly the limit is allowed
    big = _solid_png(side + 1, side)
    assert len(big) <= SMALL_BYTES  # refused for its pixels, not its bytes
    r = small_client.post("/api/upload", content=big, headers={"X-Filename": "wide.png"})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "wide.png" in detail and f"{side + 1}x{side}" in detail


def test_upload_eviction_drops_the_least_recently_used(small_client):
    def upload(seed):
        r = small_client.post("/api/upload", content=_encode(_test_image(8, 8, seed=seed), "PNG"))
        assert r.status_code == 200
        return r.json()["id"]

    def alive(token):
        return small_client.get(f"/api/image/upload/{token}").status_code == 200

    a, b, c = upload(1), upload(2), upload(3)  # max_uploads = 2: the oldest, a, goes
    assert not alive(a)
    r = small_client.get(f"/api/image/upload/{a}")
    assert r.status_code == 404 and a in r.json()["detail"]
    assert alive(b) and alive(c)  # ... used in this order: c is now the most recent
    assert alive(b)  # serving b makes it the most recent: a new upload drops c, not b
    d = upload(4)
    assert alive(b) and alive(d) and not alive(c)


# -- /api/search: dataset queries ----------------------------------------------------------------
def _check_hits(hits, db_files, db_ids, top_k):
    assert [h["rank"] for h in hits] == list(range(1, top_k + 1))
    assert len({h["image_id"] for h in hits}) == len(hits)
    for h in hits:
        assert h["id"] == db_ids[h["image_id"]]
        w, h_ = _pil_size(db_files[h["image_id"]])
        assert (h["width"], h["height"]) == (w, h_)
        if h["box"] is not None:
            x1, y1, x2, y2 = h["box"]
            assert -1e-3 <= x1 < x2 <= w + 1e-3 and -1e-3 <= y1 < y2 <= h_ + 1e-3, h


@pytest.mark.parametrize("q", range(6))
def test_search_dataset_query_relevance_and_ap(client, ui_index, db_files, db_ids, q):
    """Relevance marks from relevance.json, AP of each stage of the chain with the AP above."""
    n = len(db_files)
    entry = ui_index.queries[q]
    gt = ui_index.relevance[entry["object"]]
    positives, junk = set(gt["positives"]), set(gt["junk"])
    res = _search(client, **_query_body(ui_index, q, stage="ca_sr_qe", top_k=n))
    assert res["stage"] == "ca_sr_qe"
    assert res["box"] == pytest.approx(entry["box"])
    assert res["top_n"] == 6 and res["qe_m"] == 2
    _check_hits(res["results"], db_files, db_ids, n)
    assert res["ground_truth"] == {
        "object": entry["object"],
        "how": "query",
        "num_relevant": len(positives),
    }
    for h in res["results"]:
        rel = _rel(h["image_id"], db_files)
        assert h["relevant"] == (1 if rel in positives else -1 if rel in junk else 0), h
    assert set(res["latency_ms"]) == {"extraction", *CHAIN}
    assert all(v >= 0 for v in res["latency_ms"].values())
    assert set(res["ap"]) == set(CHAIN)
    for stage in CHAIN:
        full = _search(client, **_query_body(ui_index, q, stage=stage, top_k=n))
        ranked = [_rel(h["image_id"], db_files) for h in full["results"]]
        expected = written_out_ap(ranked, positives, junk) if positives else None
        assert res["ap"][stage] == pytest.approx(expected, abs=1e-9), stage
        assert full["ap"][stage] == pytest.approx(expected, abs=1e-9), stage
        assert set(full["ap"]) == set(CHAIN[: CHAIN.index(stage) + 1])


@pytest.mark.parametrize("stage", NON_CS_STAGES)
@pytest.mark.parametrize("q", [0, 3])
def test_search_equals_python_api(client, engine, ui_index, q, stage):
    entry = ui_index.queries[q]
    for top_k, extra in [(12, {}), (5, {"top_n": 3, "qe_m": 1})]:
        res = _search(client, **_query_body(ui_index, q, stage=stage, top_k=top_k, **extra))
        ref = engine.query(
            str(ui_index.root / entry["image"]), entry["box"], stage=stage, top_k=top_k, **extra
        )
        assert [h["image_id"] for h in res["results"]] == [h.image_id for h in ref]
        assert [h["rank"] for h in res["results"]] == [h.rank for h in ref]
        assert [h["score"] for h in res["results"]] == pytest.approx(
            [h.score for h in ref], rel=1e-5, abs=1e-6
        )
        for got, want in zip(res["results"], ref):
            if want.box is None:
                assert got["box"] is None
            else:
                assert got["box"] == pytest.approx(want.box, abs=1e-3)


def test_search_per_request_n_and_m(client, ui_index):
    n = 12
    filt = _search(client, **_query_body(ui_index, 1, stage="filtering", top_k=n))["results"]
    filt_ids = [h["image_id"] for h in filt]
    assert all(h["box"] is None for h in filt)  # filtering does not locate
    # N = 0: nothing reranked, the filtering order stands and nothing is located
    for stage in ("ca_sr", "ca_sr_qe"):
        res = _search(client, **_query_body(ui_index, 1, stage=stage, top_k=n, top_n=0))
        assert res["top_n"] == 0
        assert [h["image_id"] for h in res["results"]] == filt_ids, stage
        assert all(h["box"] is None for h in res["results"]), stage
    # N = 3 (and the default 6): the first N are the filtering top N reordered, each located;
    # the rest keep the filtering order, unlocated
    for top_n, qe_m in [(3, 1), (3, 3), (None, None), (12, 12)]:
        for stage in ("ca_sr", "ca_sr_qe"):
            body = _query_body(ui_index, 1, stage=stage, top_k=n)
            if top_n is not None:
                body.update(top_n=top_n, qe_m=qe_m)
            res = _search(client, **body)
            k = 6 if top_n is None else top_n
            assert (res["top_n"], res["qe_m"]) == ((6, 2) if top_n is None else (top_n, qe_m))
            ids = [h["image_id"] for h in res["results"]]
            assert sorted(ids[:k]) == sorted(filt_ids[:k]), (stage, k)
            assert ids[k:] == filt_ids[k:], (stage, k)
            assert [h["box"] is not None for h in res["results"]] == [True] * k + [False] * (
                n - k
            ), (stage, k)


def test_search_query_box_far_from_the_object_has_no_ground_truth(client, ui_index):
    entry = ui_index.queries[2]
    w, h = _pil_size(ui_index.root / entry["image"])
    candidates = [[0, 0, w / 4, h / 4], [w * 3 / 4, 0, w, h / 4], [0, h * 3 / 4, w / 4, h]]
    candidates.append([w * 3 / 4, h * 3 / 4, w, h])
    box = min(candidates, key=lambda b: _iou(b, entry["box"]))
    assert _iou(box, entry["box"]) < 0.5
    res = _search(client, source="query", id=2, box=box, top_k=4)
    assert res["ground_truth"] is None and res["ap"] is None
    assert all(h["relevant"] is None for h in res["results"])


def test_search_box_partly_outside_is_clamped(client, ui_index):
    entry = ui_index.queries[0]
    w, h = _pil_size(ui_index.root / entry["image"])
    res = _search(client, source="query", id=0, box=[-10, -20.5, w + 7, h + 3], top_k=3)
    assert res["box"] == [0.0, 0.0, float(w), float(h)]


# -- /api/search: database images as queries -----------------------------------------------------
def _annotations(ui_index):
    """[(rel path, object, box)] of every annotated database box in relevance.json."""
    out = []
    for obj, entry in sorted(ui_index.relevance.items()):
        for rel, boxes in sorted(entry.get("boxes", {}).items()):
            out.extend((rel, obj, b) for b in boxes)
    return out


def test_search_db_box_on_an_annotation_finds_its_object(client, ui_index, db_files, db_ids):
    anns = _annotations(ui_index)
    assert anns
    n = len(db_files)
    # one annotated positive, one annotated junk view when there is one
    chosen = []
    for want_junk in (False, True):
        for rel, obj, box in anns:
            if (rel in ui_index.relevance[obj]["junk"]) == want_junk:
                chosen.append((rel, obj, box))
                break
    for rel, obj, box in chosen:
        ident = db_ids[rel.rsplit(".", 1)[0]]
        # brute force: the object whose box in this image overlaps the drawn box most
        best = max((a for a in anns if a[0] == rel), key=lambda a: _iou(box, a[2]))
        assert best[1] == obj
        res = _search(client, source="db", id=ident, box=box, stage="ca_sr_qe", top_k=n)
        gt = ui_index.relevance[obj]
        positives, junk = set(gt["positives"]), set(gt["junk"])
        assert res["ground_truth"] == {
            "object": obj,
            "how": "annotation",
            "num_relevant": len(positives),
        }
        for h in res["results"]:
            r = _rel(h["image_id"], db_files)
            assert h["relevant"] == (1 if r in positives else -1 if r in junk else 0)
        ranked = [_rel(h["image_id"], db_files) for h in res["results"]]
        assert res["ap"]["ca_sr_qe"] == pytest.approx(
            written_out_ap(ranked, positives, junk), abs=1e-9
        )
        # a box overlapping the annotation by IoU >= 0.5 (not equal to it) still counts
        x1, y1, x2, y2 = box
        shrunk = [x1, y1, x1 + (x2 - x1) * 0.8, y1 + (y2 - y1) * 0.8]  # IoU 0.64
        assert _iou(shrunk, box) >= 0.5
        res2 = _search(client, source="db", id=ident, box=shrunk, top_k=2)
        assert res2["ground_truth"]["object"] == obj


def test_search_db_box_away_from_annotations_has_no_ground_truth(
    client, ui_index, db_files, db_ids
):
    anns = _annotations(ui_index)
    rel = anns[0][0]
    image_id = rel.rsplit(".", 1)[0]
    w, h = _pil_size(db_files[image_id])
    here = [a[2] for a in anns if a[0] == rel]
    candidates = []
    for fx in (0, 0.25, 0.5, 0.75):
        for fy in (0, 0.25, 0.5, 0.75):
            candidates.append([w * fx, h * fy, w * (fx + 0.25), h * (fy + 0.25)])
    box = min(candidates, key=lambda b: max(_iou(b, a) for a in here))
    assert max(_iou(box, a) for a in here) < 0.5
    res = _search(client, source="db", id=db_ids[image_id], box=box, top_k=5)
    assert res["ground_truth"] is None and res["ap"] is None
    assert all(h["relevant"] is None for h in res["results"])
    assert set(res["latency_ms"]) == {"extraction", *CHAIN}


def test_search_db_image_without_annotations_has_no_ground_truth(
    client, ui_index, db_files, db_ids
):
    annotated = {a[0] for a in _annotations(ui_index)}
    bare = [i for i in db_files if _rel(i, db_files) not in annotated]
    if not bare:
        pytest.skip("every database image of this collection holds an object")
    w, h = _pil_size(db_files[bare[0]])
    res = _search(client, source="db", id=db_ids[bare[0]], box=[0, 0, w, h], top_k=3)
    assert res["ground_truth"] is None and res["ap"] is None


# -- /api/search: uploads ------------------------------------------------------------------------
def test_search_with_an_upload_as_query(client, ui_index):
    """The query image's own file uploaded: the same ranking, but no ground truth (an upload is
    never judged, even when it shows a dataset object)."""
    entry = ui_index.queries[0]
    data = (ui_index.root / entry["image"]).read_bytes()
    up = client.post("/api/upload", content=data, headers={"X-Filename": "mine.jpg"}).json()
    assert (up["width"], up["height"]) == _pil_size(ui_index.root / entry["image"])
    res = _search(client, source="upload", id=up["id"], box=entry["box"], top_k=8)
    assert res["ap"] is None and res["ground_truth"] is None
    assert all(h["relevant"] is None for h in res["results"])
    ref = _search(client, **_query_body(ui_index, 0, top_k=8))
    assert [h["image_id"] for h in res["results"]] == [h["image_id"] for h in ref["results"]]
    assert [h["score"] for h in res["results"]] == pytest.approx(
        [h["score"] for h in ref["results"]], rel=1e-5, abs=1e-6
    )
    # a synthetic upload is searchable too
    up2 = client.post("/api/upload", content=_encode(_test_image(90, 70), "PNG")).json()
    res2 = _search(client, source="upload", id=up2["id"], box=[10, 10, 60, 50], top_k=3)
    assert len(res2["results"]) == 3 and res2["ap"] is None


# -- /api/search: bad requests -------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,status,mentions",
    [
        ({"stage": "nope"}, 400, ["'nope'"]),
        ({"stage": "cs_sr"}, 400, ["'cs_sr'", "fine-tuned"]),
        ({"stage": "cs_sr_qe"}, 400, ["'cs_sr_qe'"]),
        ({"stage": "cs_sr", "class_id": 0}, 400, ["'cs_sr'"]),
        ({"box": [1, 2, 3]}, 422, []),
        ({"box": [1, 2, 3, 4, 5]}, 422, []),
        ({"box": ["a", 2, 3, 4]}, 422, []),
        ({"box": None}, 422, []),
        ({"box": [1000.5, 1000.5, 1200.5, 1200.5]}, 400, ["1000.5", "1200.5", "outside"]),
        ({"box": [-50.5, -40, -10, -5]}, 400, ["-50.5", "outside"]),
        ({"box": [50.5, 10, 20, 40]}, 400, ["50.5", "reversed"]),
        ({"box": [10, 40.5, 50, 20]}, 400, ["40.5", "reversed"]),
        ({"box": [10, 10, 10, 40]}, 400, ["zero area"]),
        ({"top_k": 0}, 400, ["top_k", "0"]),
        ({"top_k": 501}, 400, ["top_k", "501"]),
        ({"top_k": -3}, 400, ["top_k"]),
        ({"top_n": -1}, 400, ["N=-1"]),
        ({"top_n": 13}, 400, ["N=13"]),
        ({"qe_m": 0}, 400, ["M=0"]),
        ({"qe_m": 13}, 400, ["M=13"]),
        ({"top_n": "many"}, 422, []),
        ({"source": "upload", "id": "0123456789abcdef"}, 404, ["0123456789abcdef"]),
        ({"source": "db", "id": 12}, 404, ["12"]),
        ({"source": "db", "id": -1}, 404, ["-1"]),
        ({"source": "db", "id": "abc"}, 400, ["abc"]),
        ({"source": "query", "id": 6}, 404, ["6"]),
        ({"source": "nope"}, 404, ["'nope'"]),
        ({"id": 1.5}, 422, []),
    ],
)
def test_search_bad_requests(client, ui_index, change, status, mentions):
    body = dict(_query_body(ui_index, 0, stage="ca_sr_qe", top_k=5), **change)
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/api/search", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for text in mentions:
        assert text in detail, (text, detail)


@pytest.mark.parametrize(
    "box",
    ["[NaN, 0, 50, 50]", "[0, 0, Infinity, 50]", "[-Infinity, 0, 50, 50]", "[0, 0, 1e400, 50]"],
)
def test_search_non_finite_box(client, box):
    """JSON has no NaN or infinity, but the body parser accepts NaN / Infinity and 1e400 overflows
    to inf: such a box is a bad value (400), never a search."""
    raw = f'{{"source": "query", "id": 0, "box": {box}}}'
    r = client.post("/api/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "non-finite" in r.json()["detail"]


@pytest.mark.parametrize(
    "raw",
    [
        '{"source": "query", "id": 0, "box": [0, 0, 50, 50], "top_k": 1e400}',
        '{"source": "query", "id": 0, "box": [NaN, 0, 50]}',
        '{"source": "query", "id": NaN, "box": [0, 0, 50, 50]}',
    ],
)
def test_malformed_body_with_non_finite_numbers_is_422_not_a_crash(client, raw):
    """FastAPI's own 422 answer echoes the input; with NaN or Infinity in it that answer could
    not be written as JSON (a 500). The answer names the field instead."""
    r = client.post("/api/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert all("loc" in d and "msg" in d for d in r.json()["detail"])


@pytest.mark.parametrize("source", ["query", "db"])
def test_search_refuses_a_boolean_id(client, source):
    # JSON true must not silently become image 1
    body = {"source": source, "id": True, "box": [0, 0, 50, 50]}
    r = client.post("/api/search", json=body)
    assert r.status_code == 422, r.text
    assert "id" in r.text


def test_search_with_unscored_images_answers_null_scores(ui_index):
    """With RETRIEVAL.FILTER_TOP_K = K the images after the first K are not scored (-inf inside);
    JSON has no -inf: they come back with score None, after every scored image."""
    cfg = make_cfg(ui_index.config_file, ui_index.opts + ["RETRIEVAL.FILTER_TOP_K", "8"])
    with TestClient(create_app(SearchService(InstanceSearch(cfg)))) as c:
        for stage in ("filtering", "ca_sr_qe"):
            r = c.post("/api/search", json=_query_body(ui_index, 0, stage=stage, top_k=12))
            assert r.status_code == 200, r.text
            scores = [h["score"] for h in r.json()["results"]]
            assert len(scores) == 12
            assert all(s is not None for s in scores[:8]) and scores[8:] == [None] * 4, scores


def test_search_top_k_beyond_the_database_returns_all(client, ui_index, db_files):
    res = _search(client, **_query_body(ui_index, 4, stage="ca_sr_qe", top_k=500))
    assert [h["rank"] for h in res["results"]] == list(range(1, len(db_files) + 1))
    assert sorted(h["image_id"] for h in res["results"]) == sorted(db_files)


@pytest.mark.parametrize("missing", ["box", "source", "id"])
def test_search_missing_fields(client, ui_index, missing):
    body = _query_body(ui_index, 0)
    del body[missing]
    r = client.post("/api/search", json=body)
    assert r.status_code == 422
    assert missing in r.text


def test_search_body_not_json(client):
    r = client.post(
        "/api/search", content=b"source=query&id=0", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 422


# -- concurrency ---------------------------------------------------------------------------------
def test_concurrent_searches_equal_sequential(client, ui_index, db_ids):
    bodies = [
        _query_body(ui_index, q % 6, stage=NON_CS_STAGES[q % 4], top_k=12, top_n=3 + q % 4)
        for q in range(6)
    ]
    any_db = sorted(db_ids.values())
    bodies.append(dict(source="db", id=any_db[0], box=[5, 5, 100, 90], top_k=12))
    bodies.append(dict(source="db", id=any_db[-1], box=[20, 30, 120, 110], stage="ca_sr"))

    def run(body):
        r = client.post("/api/search", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        del out["latency_ms"]
        return out

    sequential = [run(b) for b in bodies]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, bodies))
    for seq, con in zip(sequential, concurrent):
        assert [h["image_id"] for h in con["results"]] == [h["image_id"] for h in seq["results"]]
        assert [h["score"] for h in con["results"]] == pytest.approx(
            [h["score"] for h in seq["results"]], rel=1e-5, abs=1e-6
        )
        for a, b in zip(con["results"], seq["results"]):
            assert (a["box"] is None) == (b["box"] is None)
            if a["box"] is not None:
                assert a["box"] == pytest.approx(b["box"], abs=1e-3)
            assert a["relevant"] == b["relevant"]
        assert con["ap"] == seq["ap"]  # same ranking, same arithmetic
        assert con["ground_truth"] == seq["ground_truth"]


# -- CS-SR: an index whose detector scores the query objects -------------------------------------
@pytest.fixture(scope="module")
def cs_engine(ui_index, tmp_path_factory):
    """The same model with a 3-class predictor (freshly initialised: loading the saved 80-class
    one skips it), indexed again: its stored class scores are the query objects', so CS-SR
    applies. The probabilities mean nothing; what the API does with them is tested."""
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    tmp = tmp_path_factory.mktemp("cs_index")

    def cfg_with(*opts):
        return make_cfg(
            ui_index.config_file, ui_index.opts + ["MODEL.ROI_HEADS.NUM_CLASSES", "3"] + list(opts)
        )

    # saved once, so that indexing and searching load the same fresh predictor
    model = FeatureExtractor(cfg_with()).model
    cfg = cfg_with(
        "MODEL.WEIGHTS",
        save_checkpoint(model, tmp / "cs.pth"),
        "RETRIEVAL.INDEX_DIR",
        str(tmp / "index"),
        "OUTPUT_DIR",
        str(tmp / "out"),
    )
    prepare_index(cfg, FeatureExtractor(cfg), cfg.RETRIEVAL.DATASET, index_paths(cfg))
    return InstanceSearch(cfg)


def test_cs_sr_is_offered_with_the_query_objects_as_classes(cs_engine, ui_index):
    with TestClient(create_app(SearchService(cs_engine))) as c:
        info = c.get("/api/info").json()
        objects = sorted({q["object"] for q in ui_index.queries})
        assert info["stages"] == NON_CS_STAGES + ["cs_sr", "cs_sr_qe"]
        assert info["class_names"] == objects
        entry = ui_index.queries[2]
        k = objects.index(entry["object"])
        res = _search(c, **_query_body(ui_index, 2, stage="cs_sr_qe", top_k=12, class_id=k))
        assert list(res["latency_ms"]) == ["extraction", "filtering", "cs_sr", "cs_sr_qe"]
        assert set(res["ap"]) == {"filtering", "cs_sr", "cs_sr_qe"}
        ref = cs_engine.query(
            str(ui_index.root / entry["image"]),
            entry["box"],
            stage="cs_sr_qe",
            top_k=12,
            class_id=k,
        )
        assert [h["image_id"] for h in res["results"]] == [h.image_id for h in ref]
        assert [h["score"] for h in res["results"]] == pytest.approx([h.score for h in ref])
        for change, mentions in [({}, "class_id"), ({"class_id": 3}, "obj02")]:
            body = dict(_query_body(ui_index, 2, stage="cs_sr"), **change)
            r = c.post("/api/search", json=body)
            assert r.status_code == 400 and mentions in r.json()["detail"], r.text
