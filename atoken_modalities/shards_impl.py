"""WebDataset-style tar shards: an index of member offsets, ranged reads, decoding in worker
processes, and a writer.

Determinism. The index (per sample: its shard and where each member's bytes lie) is built once
by reading tar headers. A batch is a list of *plans* drawn from the step's generator, each a
sample index and five uniform numbers that fix the augmentation (temporal start, crop top, crop
left, flip, 3D rotation); the bytes of exactly those members are fetched with ranged reads and
decoded. A sample that cannot be decoded is replaced by a plan drawn from a stream of its
batch position's own (seeded from the generator's state and the position), so the batch is a
function of the generator alone, whatever was decoded (or found corrupt) before, and each
sample a function of the generator and its position alone. A data-parallel rank
(:meth:`TarShards.train_batch_part`) therefore draws every plan of the global batch (a few
random numbers each) but reads and decodes only its own positions ``rank::world``, and gets
exactly its slice of the single-process batch, corrupt members included, with no word from the
other ranks; the generator is left past the batch's plans, the same on every rank.

Workers. ``workers > 0`` decodes in spawned processes (decoding is CPU-bound and torch, PIL,
FFmpeg and the mesh renderer hold the GIL for much of it): every batch is decoded in parallel
across the pool. The trainer hands each step a fresh generator (``train.step_generator``: seed
``seed * 1_000_003 + step``), so when a call arrives with an untouched generator the source
also starts decoding the batches of the next ``prefetch`` seeds in the background. Those
guesses are stored under the exact generator state (batch size, rank) they were drawn from and
used only when a later call arrives with that same state, so a wrong guess (another modality
drew from the step's generator first, the batch size changed, steps alternate modalities)
costs wasted work, never a different batch; :meth:`TarShards.prefetch` takes the coming
generators explicitly for a trainer that knows them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import math
import multiprocessing
import pickle
import tarfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from atoken_core.imaging import resize_within
from atoken_core.interfaces import DataSource
from atoken_modalities.shards import DEFAULT_MEDIA
from atoken_core.tarshards import Ref, ShardError, ShardIndex, _names, read_parts, resolve_shards
from atoken_modalities.image_impl import image_from_bytes
from atoken_modalities.video_impl import video_from_bytes

log = logging.getLogger(__name__)

#: errors bad data can raise while a member is read or decoded (ImageError, VideoError, MeshError
#: and ThreeDError are ValueErrors); anything else is a bug and propagates
DATA_ERRORS = (ValueError, OSError, EOFError, RuntimeError, tarfile.TarError)
KEEP_SKIPPED = 10  # messages kept in ``skipped``
AUGMENT_DRAWS = 5  # uniform numbers drawn per sample: temporal start, top, left, flip, rotation




# ----------------------------------------------------------------------------- decoding


def mesh_from_bytes(data: bytes, name: str, ext: str, colour_seed: int) -> Any:
    """An encoded mesh as an :class:`objects_impl.Mesh` normalised into the unit cube, with the
    synthetic colour field when it has no vertex colours (as ``prepare_mesh``)."""
    from atoken_modalities.mesh_render import colour_field, normalise
    from atoken_modalities.mesh_render import mesh_from_bytes as decode_mesh
    from atoken_modalities.objects_impl import Mesh

    vertices, faces, colors = decode_mesh(data, name, ext)
    vertices = normalise(vertices)
    if colors is None:
        colors = colour_field(vertices, colour_seed)
    return Mesh(name.rsplit("#", 1)[-1], vertices, faces, colors)


def _pick(u: float, n: int) -> int:
    """A uniform number in [0, 1) as one of ``n`` positions."""
    return min(int(u * n), n - 1)


def crop_window(x: torch.Tensor, u: Sequence[float], crop: int) -> torch.Tensor:
    """A view of the ``crop`` x ``crop`` window (..., H, W) of ``x`` whose top-left corner ``u[1]``,
    ``u[2]`` choose (each side whole when it is shorter than ``crop``)."""
    h, w = x.shape[-2:]
    ch, cw = min(crop, h), min(crop, w)
    top, left = _pick(u[1], h - ch + 1), _pick(u[2], w - cw + 1)
    return x[..., top : top + ch, left : left + cw]


def crop_sample(x: torch.Tensor, u: Sequence[float], crop: int, frames: int | None) -> torch.Tensor:
    """The crop (and flip) a plan's uniform numbers choose, as a fresh tensor (so pickling it
    does not carry the whole decoded sample)."""
    if frames is not None:
        start = _pick(u[0], x.shape[0] - frames + 1)
        x = x[start : start + frames]
    x = crop_window(x, u, crop)
    return x.flip(-1) if u[3] < 0.5 else x.clone()


@functools.lru_cache(maxsize=8)
def _cameras(kind: str, n: int, radius: float, fov: float, size: int) -> Any:
    from atoken_modalities.cameras import orbit_cameras, sphere_cameras

    if kind == "ring":  # held-out views 25 degrees up, as packaged_meshes scores them
        return orbit_cameras(n, radius, fov, size, elevation_deg=25.0)
    return sphere_cameras(n, radius, fov, size)


def decode(config: Any, mode: str, ref: Ref, blobs: Mapping[str, bytes], u: Sequence[float] | None,
           modality: Any = None) -> Any:
    """One sample from its members' bytes. ``mode``: ``train`` (a crop chosen by ``u``; for 3D the
    rotation), ``eval`` (native size; the first ``eval_frames`` frames; 3D scored on a ring of
    held-out views) or ``pool`` (whole sample, resized as for training, for PCA; for 3D the
    parsed mesh, only to check it). Any other modality reads the member itself
    (:meth:`Modality.read_bytes`); its training samples are ``crop`` x ``crop`` windows at a
    position chosen by ``u`` (whole when smaller), never resized or flipped (values such as
    motion vectors may depend on the scale and direction)."""
    media = blobs["media"]
    if not media:
        raise ShardError(f"{ref.name}: empty member (0 bytes)")
    c = config
    if modality is not None:
        x = modality.read_bytes(media, ref.name)
        if mode == "eval" or not torch.is_tensor(x) or x.ndim < 2:
            return x
        return x if mode == "pool" else crop_window(x, u, c.crop).clone()
    if c.modality == "image":
        x = image_from_bytes(media, ref.name)  # atoken_modalities.image_impl
        if mode == "eval":
            return x
        x = resize_within(x, min_side=c.crop)
        return x if mode == "pool" else crop_sample(x, u, c.crop, None)
    if c.modality == "video":
        from atoken_modalities.video_impl import VideoError

        clip = resize_within(video_from_bytes(media, ref.name, ref.ext, c.max_frames), max_side=c.max_side)
        if mode == "eval":
            return clip[: c.eval_frames].clone()
        if clip.shape[0] < c.frames:
            raise VideoError(f"{ref.name}: {clip.shape[0]} frames, shorter than a {c.frames}-frame crop")
        clip = resize_within(clip, min_side=c.crop)
        return clip if mode == "pool" else crop_sample(clip, u, c.crop, c.frames)
    from atoken_modalities.objects_impl import make_asset, rotation_y

    mesh = mesh_from_bytes(media, ref.name, ref.ext, c.colour_seed)
    if mode == "pool":
        return mesh  # (only checked: 3D has no PCA pool)
    cameras = _cameras("sphere", c.views, c.radius, c.fov, c.size)
    if mode == "eval":
        return make_asset(mesh, cameras, c.resolution, _cameras("ring", c.eval_views, c.radius, c.fov, c.size))
    if c.rotate:
        mesh = mesh.rotated(rotation_y(u[4] * 2 * math.pi))
    return make_asset(mesh, cameras, c.resolution)


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace").strip()


def decode_ref(config: Any, mode: str, ref: Ref, blobs: Mapping[str, bytes] | None,
               u: Sequence[float] | None, modality: Any = None) -> tuple[Any, ...]:
    """Read (unless ``blobs`` are given) and decode one sample: ``("ok", sample, caption, label)``,
    or ``("err", message)`` when bad data makes that impossible."""
    try:
        if blobs is None:
            blobs = read_parts(ref)
        sample = decode(config, mode, ref, blobs, u, modality)
    except DATA_ERRORS as err:
        msg = str(err)
        return ("err", msg if ref.name in msg else f"{ref.name}: {type(err).__name__}: {msg}")
    return ("ok", sample, _text(blobs.get("caption")), _text(blobs.get("label")))


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker; the pool provides the parallelism


def _decode_in_worker(*args: Any) -> bytes:
    # Pickled here, by value: tensors do not travel as shared-memory handles (no file descriptor
    # per tensor, nothing for the worker to keep alive), and an image or clip goes as a numpy
    # array, which pickles ~10x faster than a torch tensor.
    result = decode_ref(*args)
    if result[0] == "ok" and torch.is_tensor(result[1]):
        result = ("ok", result[1].numpy(), *result[2:])
    return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


class _Deferred:
    """A future for ``workers = 0``: the work runs in-process when its result is asked for."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def result(self) -> Any:
        return self.fn()

    def cancel(self) -> bool:
        return True


# ----------------------------------------------------------------------------- the source


@attrs.define
class _Pending:
    """One rank's part of a batch being decoded: its batch positions, their plans and futures, a
    private generator advanced past the whole batch's plans, and the digest of the state the
    batch was drawn from (which seeds the replacement streams)."""

    generator: torch.Generator
    digest: bytes
    positions: range
    plans: list[tuple[int, list[float]]]
    futures: list[Any]


def _state_key(batch_size: int, state: torch.Tensor, rank: int, world: int) -> tuple[int, int, int, bytes]:
    return batch_size, rank, world, hashlib.blake2b(state.numpy().tobytes(), digest_size=16).digest()


def _replacement_stream(digest: bytes, position: int) -> torch.Generator:
    """The generator of the replacements of one batch position (see the module docstring)."""
    seed = hashlib.blake2b(digest + position.to_bytes(8, "little"), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(seed, "little") >> 1)


class TarShards(DataSource):
    """Samples of one modality from WebDataset-style tar shards (see the module docstring).

    ``n_skipped`` counts unreadable samples (and shards), each once; ``skipped`` keeps the first
    messages (each process counts what it reads itself: the index and held-out shards in full,
    training samples only in its own part ``rank::world`` of each batch); ``labels`` maps
    held-out sample names to their class labels (after :meth:`eval_samples`); ``prefetch_hits``
    counts batches found already decoding."""

    def __init__(self, config: Any, modality: Any = None, *, indexes: tuple[Any, Any] | None = None,
                 label: str = "tar_shards") -> None:
        """``indexes``: the (training, held-out) sample indexes when they are not the shards the
        config lists (a folder's files: :class:`atoken_core.tarshards.FileIndex`); ``label`` names
        the source in its log lines."""
        self.config = config
        self.label = label
        # The first-party modalities are decoded (and augmented) here; any other reads its members
        # itself (None for the first-party ones: decoding them needs no modality object).
        self.modality = None if config.modality in DEFAULT_MEDIA else modality
        if config.modality not in DEFAULT_MEDIA and modality is None:
            raise ShardError(f"tar_shards: modality {config.modality!r} is not one this source decodes itself "
                             "(image, video, 3d), and no modality object was given to read its members")
        media = list(config.media) or [s.lstrip(".") for s in getattr(modality, "suffixes", ())]
        if not media:
            raise ShardError(f"tar_shards: modality {config.modality!r} declares no file suffixes; "
                             "list the member extensions in `media`")
        self._skip_count, self.skipped = 0, []
        self.labels: dict[str, str] = {}
        self.prefetch_hits = 0
        self._bad: set[int] = set()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending: OrderedDict[tuple[int, bytes], _Pending] = OrderedDict()
        self._evals: list[tuple[str, Any]] | None = None
        c = config
        if indexes is None:
            self.index = ShardIndex(resolve_shards(c.shards), media, c.caption, c.label, self._report)
            self.eval_index = ShardIndex(resolve_shards(c.eval_shards), media, c.caption, c.label, self._report)
            for what, index in (("training", self.index), ("held-out", self.eval_index)):
                if not index.urls:
                    raise ShardError(f"no {what} shards listed")
                if not len(index):
                    raise ShardError(f"the {what} shards hold no sample with a {'/'.join(media)} member: "
                                     f"{_names(index.urls)}" + self._first_errors())
        else:
            self.index, self.eval_index = indexes
        self._probe()

    # -------------------------------------------------------------- bookkeeping
    @property
    def n_skipped(self) -> int:
        return self._skip_count

    def _report(self, message: str) -> None:
        self._skip_count += 1
        if len(self.skipped) < KEEP_SKIPPED:
            self.skipped.append(message)
        if self._skip_count <= KEEP_SKIPPED or math.log10(self._skip_count).is_integer():
            log.warning("%s: skipped unreadable data (%d so far): %s", self.label, self._skip_count, message)

    def _first_errors(self) -> str:
        return f"; first errors: {'; '.join(self.skipped[:3])}" if self.skipped else ""

    def _nothing_decodes(self, what: str, urls: Sequence[str]) -> ShardError:
        return ShardError(f"no {what} sample could be decoded as {self.config.modality} from the shards "
                          f"{_names(urls)}" + self._first_errors())

    def _probe(self) -> None:
        """Fail now, not mid-run, when no training sample decodes: decode samples in order until one does."""
        for i in range(len(self.index)):
            result = decode_ref(self.config, "pool", self.index[i], None, None, self.modality)
            if result[0] == "ok":
                return
            self._bad.add(i)
            self._report(result[1])
        raise self._nothing_decodes("training", self.index.urls)

    def __len__(self) -> int:
        return len(self.index)

    # -------------------------------------------------------------- workers
    def _executor(self) -> concurrent.futures.ProcessPoolExecutor | None:
        if self._pool is None and self.config.workers > 0:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.config.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (a later batch starts new ones)."""
        self._cancel_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, ref: Ref, mode: str, u: Sequence[float] | None) -> Any:
        pool = self._executor()
        if pool is None:
            return _Deferred(lambda: decode_ref(self.config, mode, ref, None, u, self.modality))
        blobs = None
        if ref.url.startswith("memory://"):
            # An in-memory filesystem lives in this process only: read here, decode there.
            try:
                blobs = read_parts(ref)
            except DATA_ERRORS as err:
                msg = str(err) if ref.name in str(err) else f"{ref.name}: cannot read: {err}"
                return _Deferred(lambda: ("err", msg))
        return pool.submit(_decode_in_worker, self.config, mode, ref, blobs, u, self.modality)

    def _result(self, future: Any) -> tuple[Any, ...]:
        out = future.result()
        if not isinstance(out, bytes):
            return out
        out = pickle.loads(out)
        return ("ok", torch.from_numpy(out[1]), *out[2:]) if isinstance(out[1], np.ndarray) else out

    def _decode_many(self, index: ShardIndex, indices: Iterable[int], mode: str) -> Iterator[tuple[int, tuple]]:
        """(i, result) in order, with up to 4 jobs per worker in flight."""
        window = max(1, 4 * self.config.workers)
        queue: list[tuple[int, Any]] = []
        for i in indices:
            queue.append((i, self._submit(index[i], mode, None)))
            if len(queue) >= window:
                j, f = queue.pop(0)
                yield j, self._result(f)
        for j, f in queue:
            yield j, self._result(f)

    # -------------------------------------------------------------- batches
    def _draw(self, generator: torch.Generator) -> tuple[int, list[float]]:
        index = int(torch.randint(len(self.index), (1,), generator=generator))
        return index, torch.rand(AUGMENT_DRAWS, generator=generator, dtype=torch.float64).tolist()

    def _submit_plan(self, plan: tuple[int, list[float]]) -> Any:
        if plan[0] in self._bad:  # known unreadable: same outcome as decoding it, without the work
            return _Deferred(lambda: ("err", None))
        return self._submit(self.index[plan[0]], "train", plan[1])

    def _start(self, key: tuple[int, int, int, bytes], state: torch.Tensor) -> _Pending:
        batch_size, rank, world, digest = key
        generator = torch.Generator()
        generator.set_state(state)
        plans = [self._draw(generator) for _ in range(batch_size)][rank::world]  # all drawn, own kept
        return _Pending(generator, digest, range(rank, batch_size, world), plans, [self._submit_plan(p) for p in plans])

    def _finish(self, pending: _Pending) -> tuple[list[Any], list[str]]:
        n = len(pending.plans)
        streams: dict[int, torch.Generator] = {}
        samples: list[Any] = [None] * n
        texts = [""] * n
        waiting = list(range(n))
        replaced = 0
        while waiting:
            failed = []
            for pos in waiting:
                result = self._result(pending.futures[pos])
                if result[0] == "ok":
                    samples[pos], texts[pos] = result[1], result[2] or ""
                    continue
                index = pending.plans[pos][0]
                if index not in self._bad:
                    self._bad.add(index)
                    self._report(result[1])
                failed.append(pos)
            if failed and len(self._bad) >= len(self.index):
                raise self._nothing_decodes("training", self.index.urls)
            replaced += len(failed)
            if replaced > max(1000, 20 * n):
                raise ShardError(f"gave up on {n} samples of a batch after {replaced} unreadable draws: most samples of "
                                 f"{_names(self.index.urls)} are unreadable" + self._first_errors())
            for pos in failed:  # replacements from each batch position's own stream
                if pos not in streams:
                    streams[pos] = _replacement_stream(pending.digest, pending.positions[pos])
                pending.plans[pos] = self._draw(streams[pos])
                pending.futures[pos] = self._submit_plan(pending.plans[pos])
            waiting = failed
        return samples, texts

    def _cancel_pending(self) -> None:
        for pending in self._pending.values():
            for f in pending.futures:
                f.cancel()
        self._pending.clear()

    def prefetch(self, batch_size: int, generators: Iterable[torch.Generator], rank: int = 0, world: int = 1) -> None:
        """Start decoding the batches (or rank ``rank``'s parts of them) that :meth:`train_batch`
        (:meth:`train_batch_part`) will be asked for with these generators (their states are
        copied, not advanced). A no-op without workers."""
        if self._executor() is None:
            return
        for g in generators:
            state = g.get_state()
            key = _state_key(batch_size, state, rank, world)
            if key not in self._pending:
                self._pending[key] = self._start(key, state)
        while len(self._pending) > max(self.config.prefetch, 1) + 1:
            _, stale = self._pending.popitem(last=False)
            for f in stale.futures:
                f.cancel()

    def train_batch(self, batch_size: int, generator: torch.Generator) -> list[Any]:
        return self.train_batch_texts(batch_size, generator)[0]

    def train_batch_texts(self, batch_size: int, generator: torch.Generator) -> tuple[list[Any], list[str] | None]:
        """``batch_size`` samples drawn with ``generator`` (left advanced past the batch's plans)
        and their captions (None when the source has no caption key; "" for a sample without a
        caption member)."""
        return self.train_batch_part(batch_size, generator, 0, 1)

    def train_batch_part(self, batch_size: int, generator: torch.Generator, rank: int,
                         world: int) -> tuple[list[Any], list[str] | None]:
        """Samples ``rank::world`` of :meth:`train_batch_texts`, the only ones read and decoded
        (the generator is left as that leaves it)."""
        state = generator.get_state()
        key = _state_key(batch_size, state, rank, world)
        pending = self._pending.pop(key, None)
        if pending is None:
            self._cancel_pending()  # the guesses were wrong: do not let them delay this batch
            pending = self._start(key, state)
        else:
            self.prefetch_hits += 1
        samples, texts = self._finish(pending)
        generator.set_state(pending.generator.get_state())
        seed = generator.initial_seed()
        if self.config.prefetch and self.config.workers and torch.equal(
                state, torch.Generator().manual_seed(seed).get_state()):
            # An untouched generator: the trainer's next steps are most likely the next seeds.
            nxt = [torch.Generator().manual_seed((seed + i) % 2**64) for i in range(1, self.config.prefetch + 1)]
            self.prefetch(batch_size, nxt, rank, world)
        return samples, (texts if self.config.caption else None)

    # -------------------------------------------------------------- held out, PCA pool
    def eval_samples(self) -> list[tuple[str, Any]]:
        """Every decodable held-out sample at native size, named ``KEY.EXT`` (prefixed with the
        shard's name where two shards share a key); their class labels land in ``labels``."""
        if self._evals is None:
            evals, seen = [], set()
            for i, result in self._decode_many(self.eval_index, range(len(self.eval_index)), "eval"):
                ref = self.eval_index[i]
                if result[0] != "ok":
                    self._report(result[1])
                    continue
                name = f"{ref.key.rsplit('/', 1)[-1]}.{ref.ext}"
                if name in seen:
                    name = f"{ref.url.rsplit('/', 1)[-1].rsplit('.', 1)[0]}-{name}"
                seen.add(name)
                evals.append((name, result[1]))
                if result[3] is not None:
                    self.labels[name] = result[3]
            if not evals:
                raise self._nothing_decodes("held-out", self.eval_index.urls)
            self._evals = evals
        return self._evals

    def train_pool(self) -> Iterator[Any]:
        """Every decodable training sample once, whole (resized as for training crops)."""
        if self.config.modality == "3d":
            raise NotImplementedError("3D assets have no PCA baseline (their tokens are back-projected view "
                                      "patches, their outputs rendered views)")
        for i, result in self._decode_many(self.index, (i for i in range(len(self.index)) if i not in self._bad),
                                           "pool"):
            if result[0] == "ok":
                yield result[1]
            elif i not in self._bad:
                self._bad.add(i)
                self._report(result[1])


# ----------------------------------------------------------------------------- writing
