"""Files written whole or not at all: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile


def atomic_write(path: str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")
