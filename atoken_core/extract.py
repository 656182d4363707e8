"""Batch latent extraction: a whole dataset -> shards of latents, for training a generative model
on top of a tokenizer (``atoken encode DATA -o OUT --ckpt C``).

DATA is a folder (any fsspec URL) of files the modality reads, or WebDataset-style tar shards
(``.tar`` files, brace patterns such as ``shards/{000..009}.tar``, globs). The samples are
listed in a fixed order (a folder's files sorted by relative name; the tars in the order given,
each tar's members grouped by key as WebDataset does, the member whose suffix the modality
reads being the sample). Sample ``i`` goes to rank ``i % world``; each rank cuts its samples,
in order, into shards of ``shard_samples``, and writes shard ``s`` atomically as
``OUT/part-RRRRR-SSSSS.safetensors``:

============  =========================  ===============================================
tensor        shape                      what
============  =========================  ===============================================
``coords``    (sum L, 4) int64           [t, x, y, z] of every token
``mean``      (sum L, C) float32         what the decoder reads (KL: posterior mean;
                                         FSQ: the quantised values)
``codes``     (sum L, groups) int64      FSQ checkpoints only
``offsets``   (N + 1,) int64             sample k's tokens are rows offsets[k]:offsets[k+1]
============  =========================  ===============================================

and string metadata: ``format`` (``atoken-latents-v1``), ``names``, ``metas``, ``frames`` (JSON
lists, one entry per sample), ``modality``, ``checkpoint`` (base name), ``checkpoint_step``,
``recipe``, ``latent_dim``, ``discrete``, ``skipped`` (JSON list of [name, message] of the
shard's unreadable files) and ``moments`` (the shard's per-channel token count, mean and sum of
squared deviations, float64, from which ``stats.json`` is combined).

Resume. ``OUT/extract.json`` (written first, by rank 0) holds the settings; a complete shard
file is never recomputed, so the same command run again after a kill redoes only the shards
that are missing (a ``.tmp-*`` file that an interrupted atomic write left is removed). Other
settings into the same OUT are refused, naming what changed. After every rank is done, rank 0
writes ``OUT/stats.json`` (per-channel mean and std for diffusion scaling) and ``OUT/index.json``
(the shards in order with their counts). Read the result with :func:`load_latents`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs
import fsspec

from atoken_core import __version__
from atoken_core.errors import UserError
from atoken_core.io import atomic_write_bytes, url_of

__all__ = ["ExtractError", "ExtractOptions", "Item", "channel_moments", "combine_moments", "is_batch_input",
           "list_items", "load_latents", "rank_shards", "read_shard", "run_extract", "shard_file"]

FORMAT = "atoken-latents-v1"
SETTINGS_FORMAT = "atoken-extract-v1"
STATS_FORMAT = "atoken-latent-stats-v1"
INDEX_FORMAT = "atoken-latents-index-v1"
SETTINGS, STATS, INDEX = "extract.json", "stats.json", "index.json"
#: extract.json keys a rerun must match (the rest describe the run)
COMPARED = ("data", "checkpoint", "checkpoint_step", "modality", "world_size", "shard_samples", "samples",
            "names_sha256")
_SHARD = re.compile(r"part-(\d{5})-(\d{5})\.safetensors")


class ExtractError(UserError, ValueError):
    """Data, an output folder or settings that a latent extraction cannot use, naming it."""


# ----------------------------------------------------------------------------- the samples


@attrs.frozen
class Item:
    """One sample to encode: a file (``part`` None) or a tar member (``part`` = (offset, size) of
    its bytes inside the tar at ``url``). ``name`` is what the shard records: the path relative
    to the data folder, or ``TAR#KEY.EXT`` with TAR relative to the shards' common folder."""

    name: str
    url: str
    part: tuple[int, int] | None = None


def _is_tar_spec(spec: str) -> bool:
    plain = re.sub(r"\{[^{}]*\}", "", spec)
    return spec.lower().endswith(".tar") or ("{" in spec and plain.lower().endswith(".tar"))


def is_batch_input(inputs: Sequence[str]) -> bool:
    """Whether ``atoken encode`` extracts a dataset: several inputs, a folder, a ``.tar`` file or
    a brace pattern of tars; otherwise it encodes one file."""
    if len(inputs) != 1:
        return True
    spec = inputs[0]
    if _is_tar_spec(spec):
        return True
    try:
        fs, path = fsspec.core.url_to_fs(spec)
        return bool(fs.isdir(path))
    except (OSError, ValueError, ImportError):
        return False


def normalised_inputs(inputs: Sequence[str]) -> tuple[str, list[str]]:
    """("folder", [its URL]) or ("tars", [every shard's URL, in order]); local paths absolute."""
    from atoken_core.tarshards import ShardError, resolve_shards

    if not inputs:
        raise ExtractError("no data given")
    tars = [s for s in inputs if _is_tar_spec(s) or any(c in s for c in "*?[")]
    folders = [s for s in inputs if s not in tars]
    if folders and (tars or len(folders) > 1):
        raise ExtractError(f"give one data folder, or tar shards; got {', '.join(inputs)}")
    if folders:
        fs, path = fsspec.core.url_to_fs(folders[0])
        if not fs.isdir(path):
            raise ExtractError(f"{folders[0]}: not a folder, a .tar shard or a brace pattern of shards")
        return "folder", [url_of(fs, path.rstrip("/"))]
    try:
        urls = resolve_shards(tars)
    except ShardError as err:
        raise ExtractError(str(err)) from None
    return "tars", urls


def _member_ext(members: dict[str, Any], suffixes: Sequence[str]) -> str | None:
    """The member extension of a WebDataset sample that the modality reads (its suffixes'
    order decides when several are present)."""
    for suffix in suffixes:
        ext = suffix.lower().lstrip(".")
        if ext in members:
            return ext
    return None


def list_items(kind: str, urls: Sequence[str], suffixes: Sequence[str],
               problem: Callable[[str], None] = lambda message: None) -> list[Item]:
    """Every sample of the data in order (see the module docstring). A tar that cannot be read
    is reported through ``problem`` and left out; one that does not exist is an error."""
    from atoken_core.io import files_under

    if kind == "folder":
        return [Item(rel, url) for rel, url in files_under(urls[0], suffixes)]
    from atoken_core.tarshards import ShardError, ShardNotFound, index_shard

    paths = [fsspec.core.url_to_fs(u)[1] for u in urls]
    common = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
    labels = [os.path.relpath(p, common) if common else p for p in paths]
    if len(set(labels)) != len(labels):
        raise ExtractError(f"a shard is listed twice: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    items = []
    for url, label in zip(urls, labels):
        try:
            entries, broken = index_shard(url)
        except ShardNotFound:
            raise ExtractError(f"{url}: shard not found") from None
        except ShardError as err:
            problem(str(err))
            continue
        if broken:
            problem(broken)
        for key, members in entries:
            ext = _member_ext(members, suffixes)
            if ext is not None:
                part = members[ext]
                items.append(Item(f"{label}#{key}.{ext}", url, (int(part.offset), int(part.size))))
    return items


def read_item(modality: Any, item: Item) -> Any:
    """The sample of ``item`` as the modality reads it (its internal form)."""
    from atoken_core.tarshards import read_range

    if item.part is None:
        return modality.read(item.url)
    return modality.read_bytes(read_range(item.url, *item.part, item.name), item.name)


def rank_shards(n_samples: int, rank: int, world: int, shard_samples: int) -> list[list[int]]:
    """The global sample indices of each of ``rank``'s shards: its samples ``rank::world`` cut,
    in order, into runs of ``shard_samples``."""
    mine = list(range(rank, n_samples, world))
    return [mine[i : i + shard_samples] for i in range(0, len(mine), shard_samples)]


def shard_file(rank: int, shard: int) -> str:
    return f"part-{rank:05d}-{shard:05d}.safetensors"


def all_shards(n_samples: int, world: int, shard_samples: int) -> list[tuple[int, int, int]]:
    """(rank, shard, samples) of every shard of an extraction, in rank then shard order."""
    return [(r, s, len(ix)) for r in range(world) for s, ix in enumerate(rank_shards(n_samples, r, world, shard_samples))]


# ----------------------------------------------------------------------------- statistics


def channel_moments(x_lc: Any) -> tuple[int, list[float], list[float]]:
    """(n, per-channel mean, per-channel sum of squared deviations M2) of the rows of
    ``x_lc`` (L, C), in float64."""
    import torch

    x = x_lc.to(torch.float64)
    n = int(x.shape[0])
    if n == 0:
        return 0, [0.0] * int(x.shape[1]), [0.0] * int(x.shape[1])
    mu = x.mean(0)
    return n, mu.tolist(), ((x - mu) ** 2).sum(0).tolist()


def combine_moments(parts: Iterable[tuple[int, Sequence[float], Sequence[float]]]) -> tuple[int, list[float], list[float]]:
    """Moments of the union of disjoint sets of rows from each set's (n, mean, M2), per channel
    (Chan, Golub & LeVeque's pairwise update: with d = mean_b - mean_a and n = n_a + n_b,
    mean = mean_a + d n_b / n and M2 = M2_a + M2_b + d^2 n_a n_b / n), in float64."""
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        if mean is None:
            n, mean, m2 = nb, list(map(float, mb)), list(map(float, m2b))
            continue
        total = n + nb
        for c in range(len(mean)):
            d = mb[c] - mean[c]
            mean[c] += d * nb / total
            m2[c] += m2b[c] + d * d * n * nb / total
        n = total
    return n, mean or [], m2 or []


def latent_stats(moments: Sequence[tuple[int, Sequence[float], Sequence[float]]]) -> dict[str, Any]:
    """Per-channel statistics of ``mean`` over all N tokens of all shards, from the shards'
    moments, in float64:

        mean_c = (1/N) sum_i x_ic
        std_c  = sqrt((1/N) sum_i (x_ic - mean_c)^2)        (population std, divisor N)

    and the same two numbers over every value of every channel (``global``), for a single
    scale factor. A diffusion model trains on ``(x - mean) / std``."""
    n, mean, m2 = combine_moments(moments)
    std = [math.sqrt(v / n) for v in m2] if n else []
    # all channels together: each channel is a group of n values with its own mean and M2
    gn, gmean, gm2 = combine_moments((n, [mean[c]], [m2[c]]) for c in range(len(mean))) if n else (0, [], [])
    return {
        "channels": len(mean), "tokens": n, "mean": mean, "std": std,
        "global": {"mean": gmean[0] if gn else None, "std": math.sqrt(gm2[0] / gn) if gn else None},
        "formula": "mean_c = sum_i x_ic / N; std_c = sqrt(sum_i (x_ic - mean_c)^2 / N) over all N tokens "
                   "(population std); normalise latents as (x - mean) / std",
    }


# ----------------------------------------------------------------------------- shard files


def read_header(url: str) -> dict[str, str]:
    """A safetensors file's string metadata, reading only its header."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ExtractError(f"{url}: not a readable safetensors file ({err})") from None
    return header.get("__metadata__") or {}


def read_shard(url: str) -> list[tuple[str, Any]]:
    """The (name, :class:`~atoken_core.api.Encoding`) of every sample of one shard, in order."""
    from atoken_core.api import Encoding
    from atoken_core.io import read_safetensors

    try:
        tensors, meta = read_safetensors(url)
    except ValueError as err:
        raise ExtractError(str(err)) from None
    if meta.get("format") != FORMAT:
        raise ExtractError(f"{url}: not an atoken latents shard (format={meta.get('format')!r})")
    names, metas, frames = json.loads(meta["names"]), json.loads(meta["metas"]), json.loads(meta["frames"])
    offsets = tensors["offsets"].tolist()
    codes = tensors.get("codes")
    out = []
    for k, name in enumerate(names):
        a, b = offsets[k], offsets[k + 1]
        out.append((name, Encoding(modality=meta["modality"], coords=tensors["coords"][a:b], mean=tensors["mean"][a:b],
                                   codes=None if codes is None else codes[a:b], frames=int(frames[k]), meta=metas[k])))
    return out


def load_latents(out_dir: str) -> Iterator[tuple[str, Any]]:
    """Every extracted sample of a finished extraction as ``(name, Encoding)``, shard by shard
    (rank 0's shards, then rank 1's, ...; within a shard in data order). ``Encoding.mean`` is
    what the decoder reads, so ``tok.decode(enc)`` reconstructs the sample; ``stats.json`` beside
    the shards holds the per-channel mean and std to normalise it with::

        stats = json.load(open("latents/stats.json"))
        for name, enc in load_latents("latents"):
            z = (enc.mean - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])  # (L, C)
            ...  # enc.coords (L, 4) [t, x, y, z]; enc.codes (L, groups) for FSQ checkpoints
    """
    fs, base = fsspec.core.url_to_fs(out_dir)
    base = base.rstrip("/")
    try:
        with fs.open(f"{base}/{INDEX}", "r") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ExtractError(f"{out_dir}: not a finished latent extraction (no {INDEX}; run atoken encode "
                           "to the end first)") from None
    for shard in index["shards"]:
        yield from read_shard(url_of(fs, f"{base}/{shard['file']}"))


# ----------------------------------------------------------------------------- the run


@attrs.frozen(kw_only=True)
class ExtractOptions:
    inputs: list[str]  # a folder, or tar shards / brace patterns / globs
    out: str  # the output folder (any fsspec URL)
    ckpt: str  # the checkpoint
    modality: str | None = None  # default: the checkpoint's only modality
    shard_samples: int = 1000  # samples per output shard
    device: str | None = None  # one process: default cuda when available; under torchrun each rank's own
    progress: bool = True
    workers: int = 4  # threads reading and decoding samples ahead of the encoder (0: none)


def _read_ahead(items: Sequence[Item], read: Callable[[Item], Any], workers: int) -> Iterator[tuple[Item, Any]]:
    """(item, sample or the UserError that reading it raised), in order; ``workers`` threads read
    up to ``workers + 1`` items ahead of the consumer (bounded memory)."""
    def attempt(item: Item) -> Any:
        try:
            return read(item)
        except UserError as err:
            return err

    if workers <= 0:
        for item in items:
            yield item, attempt(item)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="atoken-read") as pool:
        pending: deque = deque()
        todo = iter(items)
        for item in todo:
            pending.append((item, pool.submit(attempt, item)))
            if len(pending) > workers:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(attempt, nxt)))
            yield item, future.result()


def _names_digest(items: Sequence[Item]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.name.encode() + b"\0")
    return h.hexdigest()


def _check_settings(fs: Any, base: str, out: str, settings: dict[str, Any]) -> bool:
    """Refuse an OUT that holds another extraction; True when it holds this one already."""
    path = f"{base}/{SETTINGS}"
    if fs.exists(path):
        with fs.open(path, "r") as f:
            try:
                old = json.load(f)
            except ValueError:
                raise ExtractError(f"{out}/{SETTINGS}: unreadable; remove it (and the shards) to start over") from None
        changed = [k for k in COMPARED if old.get(k) != settings[k]]
        if changed:
            def shown(k: str) -> str:
                if k == "data":
                    return k
                if k == "names_sha256":
                    return f"{k} (the files changed)"
                return f"{k} {old.get(k)!r} -> {settings[k]!r}"
            raise ExtractError(f"{out}: holds an extraction with other settings ({'; '.join(map(shown, changed))}); "
                               "rerun with the same ones to continue it, or write to another folder")
        return True
    if any(_SHARD.fullmatch(p.rsplit("/", 1)[-1]) for p in fs.ls(base, detail=False)):
        raise ExtractError(f"{out}: holds latent shards but no {SETTINGS}; write to an empty folder")
    return False


def _prepare_out(out: str) -> tuple[Any, str]:
    fs, base = fsspec.core.url_to_fs(out)
    base = base.rstrip("/")
    if fs.exists(base) and not fs.isdir(base):
        raise ExtractError(f"{out}: is a file; the output of a batch extraction is a folder")
    return fs, base


def _plan(options: ExtractOptions, tok: Any, mod: Any, modality: str, world: int,
          problem: Callable[[str], None]) -> tuple[list[Item], dict[str, Any]]:
    """Rank 0's part before any shard: list the data, check or write OUT/extract.json."""
    from atoken_core.interfaces import Modality

    fs, base = _prepare_out(options.out)
    kind, urls = normalised_inputs(options.inputs)
    if kind == "tars" and getattr(type(mod), "read_bytes", None) in (None, getattr(Modality, "read_bytes", None)):
        raise ExtractError(f"modality {modality!r} cannot read tar members (it has no read_bytes); "
                           "extract from a folder of its files")
    items = list_items(kind, urls, mod.suffixes, problem)
    if not items:
        where = urls[0] if kind == "folder" else f"{len(urls)} tar shard(s)"
        raise ExtractError(f"{where}: no {modality} samples (files ending in {', '.join(mod.suffixes)})")
    cfs, cpath = fsspec.core.url_to_fs(options.ckpt)
    settings = {
        "format": SETTINGS_FORMAT, "data": urls, "checkpoint": url_of(cfs, cpath),
        "checkpoint_step": int(tok.metadata.get("state", {}).get("step", -1)), "modality": modality,
        "world_size": world, "shard_samples": options.shard_samples, "samples": len(items),
        "names_sha256": _names_digest(items), "recipe": tok.recipe.name, "latent_dim": tok.latent_dim,
        "discrete": tok.discrete, "atoken_version": __version__,
    }
    if not fs.exists(base):
        fs.makedirs(base, exist_ok=True)
    if not _check_settings(fs, base, options.out, settings):
        atomic_write_bytes(url_of(fs, f"{base}/{SETTINGS}"), (json.dumps(settings, indent=2) + "\n").encode())
    return items, settings


def _shard_bytes(encodings: list[tuple[str, Any]], skipped: list[list[str]], header: dict[str, str],
                 tok: Any) -> bytes:
    import torch
    from safetensors.torch import save as st_save

    c = tok.latent_dim
    lengths = [enc.num_tokens for _, enc in encodings]
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    mean = torch.cat([enc.mean for _, enc in encodings]) if encodings else torch.zeros(0, c)
    tensors = {
        "coords": torch.cat([enc.coords for _, enc in encodings]) if encodings else torch.zeros(0, 4, dtype=torch.int64),
        "mean": mean.to(torch.float32).contiguous(),
        "offsets": offsets,
    }
    if tok.discrete:
        groups = encodings[0][1].codes.shape[1] if encodings else 0
        tensors["codes"] = (torch.cat([enc.codes for _, enc in encodings]) if encodings
                            else torch.zeros(0, groups, dtype=torch.int64))
    n, mu, m2 = channel_moments(tensors["mean"])
    metadata = {
        **header,
        "names": json.dumps([name for name, _ in encodings]),
        "metas": json.dumps([enc.meta for _, enc in encodings]),
        "frames": json.dumps([enc.frames for _, enc in encodings]),
        "skipped": json.dumps(skipped),
        "moments": json.dumps({"tokens": n, "mean": mu, "m2": m2}),
    }
    return canonical_safetensors(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header's JSON keys sorted: safetensors writes the
    metadata from a hash map whose order changes from process to process, and a shard written
    again (resume) must be the same bytes. The header is padded to 8 bytes, as safetensors does."""
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _finish(fs: Any, base: str, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank: stats.json and index.json from the shards' headers."""
    shards, moments, skipped = [], [], []
    samples = tokens = 0
    for rank, s, _ in all_shards(settings["samples"], settings["world_size"], settings["shard_samples"]):
        name = shard_file(rank, s)
        meta = read_header(url_of(fs, f"{base}/{name}"))
        m = json.loads(meta["moments"])
        bad = json.loads(meta["skipped"])
        n_samples = len(json.loads(meta["names"]))
        shards.append({"file": name, "rank": rank, "samples": n_samples, "tokens": m["tokens"], "skipped": len(bad)})
        moments.append((m["tokens"], m["mean"], m["m2"]))
        skipped += bad
        samples += n_samples
        tokens += m["tokens"]
    if not tokens:
        first = f"; first: {skipped[0][1]}" if skipped else ""
        raise ExtractError(f"{out}: no sample could be encoded ({len(skipped)} skipped{first})")
    facts = {k: settings[k] for k in ("modality", "checkpoint", "checkpoint_step", "recipe", "latent_dim", "discrete")}
    stats = {"format": STATS_FORMAT, **latent_stats(moments), "samples": samples, "skipped": len(skipped), **facts}
    index = {"format": INDEX_FORMAT, "samples": samples, "tokens": tokens, "skipped": len(skipped), **facts,
             "shards": shards, "skipped_files": skipped}
    atomic_write_bytes(url_of(fs, f"{base}/{INDEX}"), (json.dumps(index, indent=1) + "\n").encode())
    atomic_write_bytes(url_of(fs, f"{base}/{STATS}"), (json.dumps(stats, indent=1) + "\n").encode())
    return {"samples": samples, "tokens": tokens, "shards": len(shards), "skipped": len(skipped)}


def _pick_modality(tok: Any, requested: str | None) -> str:
    if requested:
        tok.modality(requested)  # refuses one the checkpoint was not trained on
        return requested
    if len(tok.modalities) == 1:
        return tok.modalities[0]
    raise ExtractError(f"{tok.source}: trained on {', '.join(tok.modalities)}; pass --modality")


def run_extract(options: ExtractOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Extract the latents of ``options.inputs`` into ``options.out`` (see the module docstring).
    One process, or every rank under torchrun (each on its own device); rank 0 writes the
    settings, the statistics and the index, and logs the summary. Returns the summary's counts
    (``samples``, ``tokens``, ``shards``, ``skipped``, ``encoded``: samples encoded by this run)."""
    from tqdm.auto import tqdm

    from atoken_core.api import load
    from atoken_core.distributed import init_distributed

    if options.shard_samples < 1:
        raise ExtractError(f"--shard-samples must be at least 1, got {options.shard_samples}")
    fs, base = _prepare_out(options.out)  # every rank: cheap, and before the checkpoint loads
    env = init_distributed()
    group = None
    if env.distributed:
        import datetime

        import torch.distributed as dist

        # CPU-side coordination on its own gloo group: rank 0 may list a large bucket, or ranks
        # may finish far apart, for longer than NCCL's default collective timeout
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    device = env.device if env.distributed else options.device
    tok = load(options.ckpt, device=device)
    modality = _pick_modality(tok, options.modality)
    mod = tok.modality(modality)

    problems: list[str] = []
    plan: list[Any] = [None, None, None]  # (items, settings, error) from rank 0
    if env.is_main:
        try:
            plan[0], plan[1] = _plan(options, tok, mod, modality, env.world, problems.append)
        except Exception as err:  # every rank raises it, rather than waiting for rank 0
            plan[2] = err
    if env.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(plan, src=0, group=group)
    if plan[2] is not None:
        raise plan[2]
    items, settings = plan[0], plan[1]
    for message in problems:
        print(f"atoken: warning: {message}", file=sys.stderr)

    header = {"format": FORMAT, "modality": modality, "checkpoint": os.path.basename(options.ckpt.rstrip("/")),
              "checkpoint_step": str(settings["checkpoint_step"]), "recipe": tok.recipe.name,
              "latent_dim": str(tok.latent_dim), "discrete": str(tok.discrete).lower()}
    shards = rank_shards(len(items), env.rank, env.world, options.shard_samples)
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}  # one listing, not a request per shard
    for name in sorted(present):
        if name.startswith(f"part-{env.rank:05d}-") and ".safetensors.tmp-" in name:
            fs.rm(f"{base}/{name}")  # an atomic write that a kill interrupted
    todo = [s for s in range(len(shards)) if shard_file(env.rank, s) not in present]
    done = sum(len(shards[s]) for s in range(len(shards)) if s not in todo)
    bar = tqdm(total=sum(len(ix) for ix in shards), initial=done, unit="sample", dynamic_ncols=True,
               desc=f"encode {modality}" + (f" (rank 0 of {env.world})" if env.distributed else ""),
               disable=not (options.progress and env.is_main))
    encoded = 0
    try:
        for s in todo:
            batch = [items[i] for i in shards[s]]
            encodings, skipped = [], []
            for item, sample in _read_ahead(batch, lambda it: read_item(mod, it), options.workers):
                try:
                    if isinstance(sample, UserError):
                        raise sample
                    encodings.append((item.name, tok.encode(sample, modality, read=True)))
                except UserError as err:
                    skipped.append([item.name, str(err).splitlines()[0]])
                bar.update(1)
            atomic_write_bytes(url_of(fs, f"{base}/{shard_file(env.rank, s)}"),
                               _shard_bytes(encodings, skipped, header, tok))
            encoded += len(encodings)
    finally:
        bar.close()

    stats_exist = fs.exists(f"{base}/{STATS}") and fs.exists(f"{base}/{INDEX}")
    worked = _any_rank_worked(len(todo), env, group)  # also the barrier: every rank is done after it
    report = {"encoded": encoded}
    if env.is_main:
        counts = _finish(fs, base, options.out, settings)
        report.update(counts)
        where = url_of(fs, f"{base}/{STATS}")
        if not worked and stats_exist:
            log(f"{options.out}: nothing to do, the extraction is complete ({counts['samples']} samples, "
                f"{counts['skipped']} skipped, {counts['shards']} shards); per-channel mean/std in {where}")
        else:
            listed = f": see {INDEX}" if counts["skipped"] else ""
            log(f"{modality}: {counts['samples']} samples ({counts['skipped']} skipped{listed}), {counts['tokens']} "
                f"tokens in {counts['shards']} shards -> {options.out}; per-channel mean/std in {where}")
    return report


def _any_rank_worked(shards_written: int, env: Any, group: Any) -> bool:
    """Whether any rank had shards to write in this run; under torchrun a collective (every
    rank calls it after its last shard, so it is the barrier before the statistics)."""
    if not env.distributed:
        return shards_written > 0
    import torch
    import torch.distributed as dist

    t = torch.tensor([shards_written], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t.item()) > 0
