"""The weights an index was built with: kept beside it or pointed to, and loaded to search it.

An index is searchable only with the weights that made its features. Part of a model may have no
file: with ``MODEL.WEIGHTS: ""`` the EfficientNet backbone has its ImageNet weights but the RPN
(and box head) are freshly initialised. Seeding the random generator does not reproduce them
reliably (another torch version, device or call order draws other numbers), so
:func:`weights_record` saves the weights of the index's scope (see
``extractor.WEIGHTS_SCOPES``: backbone and proposal generator, plus the box head only for an index
with class outputs) once, as ``weights-<hash>.pth`` in the index's parent folder (beside the
learned transforms, not inside the index, whose bytes are the index's size), and the manifest
records it under ``weights_file``. When ``MODEL.WEIGHTS`` names a file, the manifest points to
it instead.

Every entry point (``tools/retrieve.py``, the Python API, ``tools/serve.py``) calls
:func:`adopt_index_weights` before it searches or extends an index: when its config gives no
``MODEL.WEIGHTS``, the recorded weights are loaded into its model. A saved file is a detectron2
checkpoint (``{"model": state_dict}``), so ``MODEL.WEIGHTS`` may also name it.
"""

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from detectron2.utils import comm

from ..utils.io import atomic_write
from .extractor import FeatureExtractor, feature_state_dict
from .index_store.errors import IndexWriteError
from .index_store.layout import CONFIG_NAME, MANIFEST_NAME, read_json

__all__ = ["WEIGHTS_KEY", "adopt_index_weights", "recorded_weights", "weights_record"]

logger = logging.getLogger("retrieval_ext")

# the manifest key naming the weights file (informational: not compared between manifests)
WEIGHTS_KEY = "weights_file"


def weights_record(extractor: FeatureExtractor, work_dir: str) -> str:
    """The ``weights_file`` value of an index the extractor writes, saving the weights if needed.

    Returns:
        the absolute path of ``MODEL.WEIGHTS`` when the model was loaded from that file alone;
        otherwise ``weights-<hash>.pth``, a file of ``work_dir`` written here once (on the main
        process) with the weights of the extractor's scope.
    """
    source = extractor.weights_file
    if source and not extractor.model_given and os.path.isfile(source):
        return os.path.abspath(source)
    fp = extractor.fingerprint
    name = f"weights-{fp['weights_hash']}.pth"
    path = Path(work_dir) / name
    if comm.is_main_process() and not path.is_file():
        state = feature_state_dict(extractor.model, fp["weights_scope"])
        data = {
            "model": {k: v.detach().cpu() for k, v in state.items()},
            "weights_hash": fp["weights_hash"],
            "weights_scope": fp["weights_scope"],
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(data, tmp))
        except OSError as e:  # e.g. the index folder under a regular file
            reason = "Not a directory" if isinstance(e, FileExistsError) else e.strerror or ""
            raise IndexWriteError(
                f"cannot save the weights the index is built with to {path}: {reason} ({e})"
            ) from e
        logger.info(f"saved the weights the index is built with to {path}")
    comm.synchronize()
    return name


def _stored_manifest(index_dir: str) -> Optional[dict]:
    """The manifest of the index (finalized or being written) in ``index_dir``, or None."""
    for name in (MANIFEST_NAME, CONFIG_NAME):
        path = Path(index_dir) / name
        if path.is_file():
            return read_json(path).get("manifest")
    return None


def recorded_weights(index_dir: str, manifest: Optional[dict] = None) -> Optional[Path]:
    """The weights file the index in ``index_dir`` records (None: it records none); a relative
    name is a file of the index's parent folder."""
    manifest = manifest if manifest is not None else _stored_manifest(index_dir)
    value = (manifest or {}).get(WEIGHTS_KEY)
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else Path(os.path.abspath(index_dir)).parent / path


def adopt_index_weights(extractor: FeatureExtractor, index_dir: str) -> bool:
    """Load the weights the index in ``index_dir`` was built with into ``extractor``'s model,
    when its config names no weights file (``MODEL.WEIGHTS: ""``) and it built its own model.

    Returns:
        whether weights were loaded. Nothing is loaded when there is no index, it records no
        weights, or the file is gone (a warning names it; the index's weights hash then decides).
    """
    if extractor.weights_file or extractor.model_given:
        return False
    manifest = _stored_manifest(index_dir)
    path = recorded_weights(index_dir, manifest)
    if path is None:
        return False
    if not path.is_file():
        logger.warning(
            f"the weights the index {index_dir} was built with ({path}) are missing; "
            "searching it needs MODEL.WEIGHTS set to a file holding them"
        )
        return False
    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data["model"] if isinstance(data, dict) and "model" in data else data
    extractor.load_weights(state)
    logger.info(f"loaded the weights of the index {index_dir} from {path}")
    return True
