"""Whether two manifests (what produced an index) agree, and a readable account of what differs."""

import difflib
import json
from typing import Callable, Dict, Optional, Sequence

import yaml

from .errors import IndexMismatchError

__all__ = ["INFORMATIONAL_KEYS", "check_manifest_compatible", "jsonable"]

# Manifest keys that describe an index without deciding what it is: where the weights it was
# built with are kept (two copies of one file are the same weights; the hash says so). They are
# compared only when asked for by name.
INFORMATIONAL_KEYS = ("weights_file",)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_SHORT = 80


def jsonable(x):
    """``x`` after a JSON round trip (tuples become lists), or its repr if not serialisable."""
    try:
        return json.loads(json.dumps(x, sort_keys=True))
    except (TypeError, ValueError):
        return repr(x)


def _comparable(key: str, x, normalize=None):
    """The form in which a manifest value is compared.

    Config dumps (keys ending in ``_config``) are compared as parsed YAML: a config re-loaded from
    the ``config.yaml`` a run saved dumps the same values without the anchors (``&id001``) that
    shared lists get, and must still match the index it built.
    """
    if normalize and key in normalize and isinstance(x, str):
        return jsonable(normalize[key](x))
    if key.endswith("_config") and isinstance(x, str):
        try:
            return jsonable(yaml.safe_load(x))
        except yaml.YAMLError:
            pass
    return jsonable(x)


def _short_repr(x) -> str:
    r = repr(x)
    return r if len(r) <= _SHORT else r[: _SHORT - 3] + "..."


def _describe_difference(key: str, stored, expected) -> str:
    long_text = any(
        isinstance(v, str) and (len(v) > _SHORT or "\n" in v) for v in (stored, expected)
    )
    if not long_text:
        return f"  {key}: stored={_short_repr(stored)} expected={_short_repr(expected)}"
    a = "" if stored is _MISSING else str(stored)
    b = "" if expected is _MISSING else str(expected)
    diff = list(
        difflib.unified_diff(a.splitlines(), b.splitlines(), "stored", "expected", n=1, lineterm="")
    )
    max_lines = 14
    shown = diff[:max_lines]
    if len(diff) > max_lines:
        shown.append(f"... ({len(diff) - max_lines} more diff lines)")
    if not diff:  # differs only in trailing whitespace / newlines
        shown = [f"stored={_short_repr(a)}", f"expected={_short_repr(b)}"]
    body = "\n".join("    " + line for line in shown)
    return (
        f"  {key}: stored={_short_repr(stored)} expected={_short_repr(expected)}; "
        f"first differing lines:\n{body}"
    )


def check_manifest_compatible(
    stored: dict,
    expected: dict,
    keys: Optional[Sequence[str]] = None,
    normalize: Optional[Dict[str, Callable]] = None,
):
    """Raise unless ``stored`` and ``expected`` agree on ``keys``.

    Values are compared after a JSON round trip (so tuples equal lists), config dumps as parsed
    YAML (see :func:`_comparable`). A key absent from one side differs from any value on the
    other.

    Args:
        stored: manifest of an existing index (the caller's dict, e.g. ``reader.manifest``).
        expected: manifest the caller is about to write or search with.
        keys: keys to compare; ``None`` compares the union of both dicts' keys but
            :data:`INFORMATIONAL_KEYS`.
        normalize: {key: function of a stored string value -> the values to compare}, for keys
            whose text may differ without a difference that matters (e.g. a config dump with
            keys that do not affect the features).

    Raises:
        IndexMismatchError: naming each differing key with both values (long texts such as a
            config dump are shortened and shown as a unified diff of their first differing lines).
    """
    if keys is None:
        keys = sorted((set(stored) | set(expected)) - set(INFORMATIONAL_KEYS))
    diffs, bad = [], []
    for key in keys:
        a = stored.get(key, _MISSING)
        b = expected.get(key, _MISSING)
        if (a is _MISSING) != (b is _MISSING) or _comparable(key, a, normalize) != _comparable(
            key, b, normalize
        ):
            bad.append(key)
            diffs.append(_describe_difference(key, a, b))
    if bad:
        raise IndexMismatchError(
            f"index manifest mismatch on {len(bad)} key(s) {bad}:\n" + "\n".join(diffs), bad
        )
