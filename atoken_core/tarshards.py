"""WebDataset-style tar shards as a container: brace patterns, an index of member offsets read
from tar headers, ranged reads of a sample's members, and a writer; and the same index over a
folder's files (:class:`FileIndex`: each file one sample), so folders stream through the same
reader. What a member holds is for a modality to decode
(:meth:`~atoken_core.interfaces.Modality.read_bytes`); this module only finds and fetches the bytes."""

from __future__ import annotations

import concurrent.futures
import io
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import attrs
import fsspec
import numpy as np

from atoken_core.errors import UserError
from atoken_core.io import url_of


class ShardError(UserError, ValueError):
    """A shard set, shard or member that cannot be used, naming where it came from."""


class ShardNotFound(ShardError):
    """A listed shard does not exist (a configuration mistake, never skipped)."""


# ----------------------------------------------------------------------------- shard URIs

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Brace patterns as WebDataset writes them: ``a-{000..002}.tar`` -> ``a-000.tar a-001.tar
    a-002.tar`` (zero padding kept), ``{train,val}.tar`` -> two names; several groups multiply.
    A group with neither ``..`` nor ``,`` is kept literally."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = _RANGE.fullmatch(body)
    if rng:
        lo, hi = rng.groups()
        width = max(len(lo), len(hi)) if re.match(r"-?0\d", lo) or re.match(r"-?0\d", hi) else 0
        a, b = int(lo), int(hi)
        items = [str(i).zfill(width) for i in range(a, b + (1 if b >= a else -1), 1 if b >= a else -1)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def resolve_shards(patterns: Sequence[str]) -> list[str]:
    """Shard URIs from URIs, brace patterns and globs (globs are sorted; order is otherwise kept)."""
    urls = []
    for pattern in patterns:
        for p in expand_braces(pattern):
            fs, path = fsspec.core.url_to_fs(p)
            if any(c in path for c in "*?["):
                matches = sorted(fs.glob(path))
                if not matches:
                    raise ShardError(f"{p}: no shard matches this pattern")
                urls += [url_of(fs, m) for m in matches]
            else:
                urls.append(url_of(fs, path))
    return urls


def _names(urls: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(urls[:limit])
    return shown + (f", ... ({len(urls)} shards)" if len(urls) > limit else "")


# ----------------------------------------------------------------------------- index


class Part(NamedTuple):
    """Where one member's bytes lie inside its shard (or inside ``url``, a file of its own)."""

    offset: int
    size: int
    url: str | None = None


#: one shard's samples in tar order: (key, {extension: Part})
ShardEntries = list[tuple[str, dict[str, Part]]]

_MEMBER = re.compile(r"((?:.*/|)[^./][^./]*)\.([^/]*)")  # WebDataset's key/extension split
_INDEX_CACHE: dict[tuple[str, str], tuple[ShardEntries, str | None]] = {}
_INDEX_LOCK = threading.Lock()


def split_member(name: str) -> tuple[str, str] | None:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``): the key runs to the first dot of
    the file name, as in WebDataset. None for names without an extension or starting with a dot."""
    m = _MEMBER.fullmatch(name)
    return (m.group(1), m.group(2).lower()) if m else None


def scan_shard(url: str) -> tuple[ShardEntries, str | None]:
    """Read a shard's tar headers (seeking over member data) into its samples and member
    locations, and a problem to report when the tar breaks off part-way (a shard cut short keeps
    the samples before the break; a member cut short is caught by its ranged read)."""
    fs, path = fsspec.core.url_to_fs(url)
    samples: dict[str, dict[str, Part]] = {}
    problem = None
    with fs.open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as err:
            raise ShardError(f"{url}: not a readable uncompressed tar file ({err}); shards must be plain .tar "
                             "so members can be read by offset") from None
        with tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as err:
                    problem = f"{url}: tar breaks off after {len(tar.members)} members ({err}); the rest is ignored"
                    break
                if member is None:
                    break
                split = split_member(member.name) if member.isfile() else None
                if split is not None:
                    samples.setdefault(split[0], {})[split[1]] = Part(member.offset_data, member.size)
    return list(samples.items()), problem


def index_shard(url: str) -> tuple[ShardEntries, str | None]:
    """:func:`scan_shard`, cached in memory for as long as the file's properties do not change."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        stamp = fs.ukey(path)
    except FileNotFoundError:
        raise ShardNotFound(f"{url}: shard not found") from None
    with _INDEX_LOCK:
        cached = _INDEX_CACHE.get((url, stamp))
    if cached is None:
        cached = scan_shard(url)
        with _INDEX_LOCK:
            _INDEX_CACHE[(url, stamp)] = cached
    return cached


def clear_index_cache() -> None:
    with _INDEX_LOCK:
        _INDEX_CACHE.clear()


@attrs.frozen
class Ref:
    """One sample's members: the shard, a name for messages, the media extension and the parts
    to read (``media`` and, where present, ``caption`` and ``label``)."""

    url: str
    key: str
    ext: str
    parts: dict[str, Part]
    #: members known as text already (a folder's captions.json entry), returned by read_parts as bytes
    texts: dict[str, str] = attrs.field(factory=dict)
    #: the sample is the whole file ``url`` (a folder's), not a member of a tar
    whole_file: bool = False

    @property
    def name(self) -> str:
        return self.url if self.whole_file else f"{self.url}#{self.key}.{self.ext}"


class ShardIndex:
    """The samples of a shard set that have a media member, in shard then tar order. Holds two
    integers per sample beside the (cached, shared) per-shard entries."""

    def __init__(self, urls: Sequence[str], media: Sequence[str], caption: str, label: str,
                 skipped: Callable[[str], None]) -> None:
        self.urls = list(urls)
        self.media, self.caption, self.label = list(media), caption, label
        threads = max(1, min(16, len(self.urls)))
        with concurrent.futures.ThreadPoolExecutor(threads) as ex:  # header reads are I/O-bound
            futures = [ex.submit(index_shard, u) for u in self.urls]
        self.entries: list[ShardEntries] = []
        for f in futures:
            try:
                entries, problem = f.result()
            except ShardNotFound:
                raise
            except ShardError as err:  # a corrupt shard is reported and left out, like a corrupt member
                entries, problem = [], str(err)
            if problem:
                skipped(problem)
            self.entries.append(entries)
        media_set = set(self.media)
        shard_ix, entry_ix = [], []
        for s, entries in enumerate(self.entries):
            for e, (_, members) in enumerate(entries):
                if media_set.intersection(members):
                    shard_ix.append(s)
                    entry_ix.append(e)
        self.shard_ix = np.asarray(shard_ix, dtype=np.int64)
        self.entry_ix = np.asarray(entry_ix, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.shard_ix)

    def __getitem__(self, i: int) -> Ref:
        s = int(self.shard_ix[i])
        key, members = self.entries[s][int(self.entry_ix[i])]
        ext = next(x for x in self.media if x in members)
        parts = {"media": members[ext]}
        for role, member_ext in (("caption", self.caption), ("label", self.label)):
            if member_ext and member_ext in members:
                parts[role] = members[member_ext]
        return Ref(self.urls[s], key, ext, parts)


class FileIndex:
    """A folder's files as samples, each the whole of its file, with :class:`ShardIndex`'s
    interface (``urls``, ``len``, ``index[i]`` -> :class:`Ref`): only paths and sizes are held,
    the bytes are read when a sample is drawn."""

    def __init__(self, root: str, suffixes: Sequence[str], captions: Sequence[str] | None = None) -> None:
        fs, base = fsspec.core.url_to_fs(root)
        if not fs.isdir(base):
            raise ShardNotFound(f"{root}: folder not found")
        base = base.rstrip("/")
        ends = tuple(s.lower() for s in suffixes)
        found = sorted((p, int(info.get("size") or 0)) for p, info in fs.find(base, detail=True).items()
                       if p.lower().endswith(ends))
        self.root = root
        self.names = [p[len(base) + 1 :] if p.startswith(base + "/") else p.rsplit("/", 1)[-1] for p, _ in found]
        self.urls = [url_of(fs, p) for p, _ in found]
        self.sizes = np.asarray([size for _, size in found], dtype=np.int64)
        if captions is not None and len(captions) != len(self.urls):
            raise ShardError(f"{root}: {len(captions)} captions for {len(self.urls)} files")
        self.captions = list(captions) if captions is not None else None

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> Ref:
        name = self.names[i]
        stem, _, ext = name.rpartition(".")
        texts = {"caption": self.captions[i]} if self.captions is not None else {}
        return Ref(self.urls[i], stem, ext.lower(), {"media": Part(0, int(self.sizes[i]))}, texts, whole_file=True)


def read_parts(ref: Ref) -> dict[str, bytes]:
    """The bytes of a sample's members, each by one ranged read (the whole file for a folder's)."""
    out = {role: text.encode("utf-8") for role, text in ref.texts.items()}
    for role, part in ref.parts.items():
        url = part.url or ref.url
        out[role] = (read_range(url, None, None, ref.name) if ref.whole_file
                     else read_range(url, part.offset, part.size, ref.name, f"member {role}"))
    return out


def read_range(url: str, offset: int | None, size: int | None, name: str, what: str = "member") -> bytes:
    """``size`` bytes of ``url`` from ``offset`` by one ranged read (the whole file when both are
    None); errors are :class:`ShardError` naming ``name`` (a short read: "truncated ``what``")."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        data = fs.cat_file(path) if offset is None else fs.cat_file(path, start=offset, end=offset + size)
    except FileNotFoundError:
        raise ShardError(f"{name}: {'file' if offset is None else 'shard'} not found") from None
    except (IsADirectoryError, PermissionError) as err:
        raise ShardError(f"{name}: cannot read: {err}") from None
    if size is not None and len(data) != size:
        raise ShardError(f"{name}: truncated {what} ({len(data)} of {size} bytes)")
    return data


def write_shards(samples: Iterable[tuple[str, Mapping[str, bytes | str | int]]], pattern: str,
                 per_shard: int) -> list[str]:
    """Write WebDataset-style shards: each record ``(key, {ext: data})`` becomes members
    ``KEY.EXT`` (str and int data are written as UTF-8 text), ``per_shard`` records per shard,
    at ``pattern % shard_number`` (e.g. ``memory://data/train-%06d.tar``; any fsspec URL).
    Returns the URLs written. Members carry mtime 0, so equal input gives byte-identical shards."""
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    urls: list[str] = []
    stream = iter(samples)
    while True:
        batch = [r for _, r in zip(range(per_shard), stream)]
        if not batch:
            return urls
        url = pattern % len(urls)
        with fsspec.open(url, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in batch:
                if "." in key.rsplit("/", 1)[-1] or not key:
                    raise ValueError(f"sample key {key!r}: keys must be non-empty with no dot in the file name")
                for ext, data in members.items():
                    raw = data if isinstance(data, bytes) else str(data).encode("utf-8")
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(raw), 0, 0o644
                    tar.addfile(info, io.BytesIO(raw))
        urls.append(url)
