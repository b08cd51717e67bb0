"""The browser UI's web application (FastAPI): a static page plus a small JSON API.

Endpoints (all under the server's root):

- ``GET /``: the page (``static/index.html``); ``GET /static/...``: its script and style sheet.
- ``GET /api/info``: dataset, image and query counts, the stages this index can run, N, M.
- ``GET /api/images?source=db|query&q=TEXT&offset=0&limit=60``: browse / search the collection.
- ``GET /api/image/{source}/{id}?size=PX``: an image as JPEG (``size``: longer side, 0 = full).
- ``POST /api/upload``: the raw bytes of an image file as the body (``X-Filename`` names it in
  messages); answers ``{"source": "upload", "id", "width", "height"}``.
- ``POST /api/search``: ``{"source", "id", "box": [x1, y1, x2, y2], "stage", "top_n", "qe_m",
  "top_k", "class_id"}``; answers the ranked results, their located boxes, each stage's latency
  and, with ground truth, relevance marks and AP (see :meth:`SearchService.search`).

Errors answer ``{"detail": message}``: 400 a bad value (the message names it), 404 an unknown
image, 413 an upload over the limit, 422 a malformed request body.
"""

import logging
import os
from typing import List, Optional, Union

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from ..data.mapper import UnreadableImageError
from .service import ImageNotFound, RequestError, SearchService, UploadTooLarge

__all__ = ["create_app", "SearchRequest"]

logger = logging.getLogger("retrieval_ext")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class SearchRequest(BaseModel):
    """Body of ``POST /api/search``."""

    source: str = Field(description="'db', 'query' or 'upload'")
    # strict: JSON true is not image 1
    id: Union[StrictInt, StrictStr] = Field(
        description="index position, query number or upload token"
    )
    box: List[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels")
    stage: str = "ca_sr_qe"
    top_n: Optional[int] = None
    qe_m: Optional[int] = None
    top_k: int = 24
    class_id: Optional[int] = None


def create_app(service: SearchService) -> FastAPI:
    """The application serving ``service`` (run it with uvicorn, or test it with TestClient)."""
    app = FastAPI(title="retrieval_ext instance search", docs_url="/api/docs", redoc_url=None)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


async def _read_upload(request: Request, name: str, limit: int) -> bytes:
    """The request body, refused beyond ``limit`` bytes before or while it is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(f"upload {name!r}: {declared} bytes is more than the {limit} allowed")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # stop reading: a body without (or with a false) length is cut off
            raise UploadTooLarge(f"upload {name!r}: more than the {limit} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


def _add_error_handlers(app: FastAPI):
    @app.exception_handler(RequestError)
    def _bad_request(request: Request, exc: RequestError):
        status = 413 if isinstance(exc, UploadTooLarge) else 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    def _malformed(request: Request, exc: RequestValidationError):
        # FastAPI's own answer echoes the input, which may hold NaN / Infinity (Python's JSON
        # parser accepts them) that no JSON answer can carry: say where and what, not the value
        detail = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(ImageNotFound)
    def _not_found(request: Request, exc: ImageNotFound):
        return JSONResponse({"detail": str(exc.args[0] if exc.args else exc)}, status_code=404)


def _add_routes(app: FastAPI, service: SearchService):
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/images")
    def images(
        source: str = "db",
        q: str = Query("", max_length=200),
        offset: int = 0,
        limit: int = 60,
    ):
        return service.list_images(source, q, offset, limit)

    @app.get("/api/image/{source}/{ident}")
    def image(source: str, ident: str, size: int = 0):
        try:
            data = service.image_jpeg(source, ident, size)
        except UnreadableImageError as e:
            # a database file that changed on disk since indexing: the server's fault, not the
            # request's; the message names the file for whoever runs the server
            logger.error(str(e))
            raise HTTPException(500, f"image {source}/{ident} cannot be read: {e.reason}")
        headers = {"Cache-Control": "no-store" if source == "upload" else "max-age=3600"}
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.post("/api/upload")
    async def upload(request: Request):
        name = request.headers.get("x-filename", "upload")[:200]
        data = await _read_upload(request, name, service.max_upload_bytes)
        try:
            # decoding takes CPU time: off the event loop, like the synchronous endpoints
            return await run_in_threadpool(service.add_upload, data, name)
        except UnreadableImageError as e:
            raise RequestError(str(e)) from None

    @app.post("/api/search")
    def search(req: SearchRequest):
        return service.search(
            req.source,
            req.id,
            req.box,
            stage=req.stage,
            top_n=req.top_n,
            qe_m=req.qe_m,
            top_k=req.top_k,
            class_id=req.class_id,
        )
