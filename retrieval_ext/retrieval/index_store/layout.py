"""The index's files on disk: their names, their JSON encoding, and reading what writers left.

Shared by the writer (which resumes from what is on disk) and the finalizer / reader; see the
package docstring for the layout.
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CONFIG_NAME",
    "SHARDS_DIR",
    "SHARD_RE",
    "json_bytes",
    "read_json",
    "shard_key",
    "list_complete_shards",
    "read_failed_logs",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "index_config.json"
SHARDS_DIR = "shards"
SHARD_RE = re.compile(r"^rank(\d{3,})-(\d{5,})$")


def json_bytes(obj) -> bytes:
    """How the index's JSON files are encoded (sorted keys, so equal content is equal bytes)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def read_json(path: Path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def shard_key(name: str) -> Tuple[int, int]:
    """(rank, number) of a complete shard's name, the order shards are read in."""
    m = SHARD_RE.match(name)
    return int(m.group(1)), int(m.group(2))


def list_complete_shards(shards_dir: Path) -> List[str]:
    """Names of renamed (hence complete) shard dirs, sorted by (rank, number)."""
    if not shards_dir.is_dir():
        return []
    names = [
        p.name
        for p in shards_dir.iterdir()
        if SHARD_RE.match(p.name) and (p / "meta.json").is_file()
    ]
    return sorted(names, key=shard_key)


def read_failed_logs(root: Path) -> Dict[str, str]:
    """Failed image ids -> reason from every rank's log; torn lines (killed mid-write) skipped."""
    failed: Dict[str, str] = {}
    for path in sorted(root.glob("failed-rank*.jsonl")):
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    failed[str(entry["image_id"])] = str(entry["reason"])
                except (ValueError, KeyError, TypeError):
                    continue
    return failed
