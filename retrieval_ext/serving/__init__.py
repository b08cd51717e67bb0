"""A local browser UI for query-by-box search over a built index (``tools/serve.py``).

:mod:`.service` holds everything the page needs without any web framework (so it is tested
directly); :mod:`.app` exposes it as a FastAPI application with a static page in ``static/``.
"""

from .service import ImageNotFound, RequestError, SearchService, UploadTooLarge

__all__ = ["ImageNotFound", "RequestError", "SearchService", "UploadTooLarge"]
