"""Files written whole or not at all: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yield a temporary folder beside ``path``; when the block ends without error it replaces ``path``.

    An existing ``path`` is refused unless ``overwrite``; on error the temporary folder is removed.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".flatquant-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".flatquant-old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_format_json(path: str, fmt: str, version: int) -> dict:
    """The JSON object in ``path``, which must declare ``"format": fmt`` and ``"format_version": version``."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("format_version") != version:
        found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
        raise ValueError(f"{path}: format {found[0]!r} v{found[1]} is not {fmt!r} v{version}")
    return meta
