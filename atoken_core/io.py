"""File I/O through fsspec: atomic writes and the cache folder."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec

CACHE_ENV = "ATOKEN_CACHE"


def cache_dir() -> Path:
    """Where converted weights are kept: ``$ATOKEN_CACHE`` or ``~/.cache/atoken``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "atoken")
    return Path(root)


def url_of(fs, path: str) -> str:
    """A path inside ``fs`` as something ``fsspec.open`` reaches again: plain for local files (so
    messages show ordinary paths), ``protocol://path`` otherwise."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol == "file" else f"{protocol}://{path}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one,
    never a partial one: write a temporary sibling, flush it to disk, then rename."""
    fs, fpath = fsspec.core.url_to_fs(path)
    parent = fpath.rsplit("/", 1)[0] if "/" in fpath else "."
    if not fs.exists(parent):
        raise FileNotFoundError(f"{path}: parent folder {parent!r} does not exist")
    tmp = f"{fpath}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
            if hasattr(f, "flush"):
                f.flush()
            if hasattr(f, "fileno"):
                try:
                    os.fsync(f.fileno())
                except (OSError, ValueError, AttributeError):
                    pass  # not a local file
        fs.mv(tmp, fpath)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def read_input(path: str, error: type[Exception]) -> bytes:
    """The bytes of an input file at any fsspec path; a missing or unreadable file raises
    ``error`` (the modality's own error type) with a message that names it."""
    try:
        return read_bytes(path)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise error(f"{path}: cannot read: {err}") from None


def read_safetensors(path: str) -> tuple[dict, dict[str, str]]:
    """(tensors, string metadata) of a safetensors file at any fsspec path. A missing file raises
    FileNotFoundError; anything that is not valid safetensors raises ValueError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_bytes(path)
    try:
        tensors = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, header.get("__metadata__") or {}


def files_under(root: str, suffixes: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """(path relative to ``root``, fsspec URL) of every file under the folder ``root`` whose name
    ends in one of ``suffixes`` (any case), sorted. A missing folder is FileNotFoundError."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"{root}: folder not found")
    base = base.rstrip("/")
    ends = tuple(s.lower() for s in suffixes)
    return [(f[len(base) + 1 :] if f.startswith(base + "/") else f.rsplit("/", 1)[-1], url_of(fs, f))
            for f in sorted(fs.find(base)) if ends and f.lower().endswith(ends)]
