"""A training step reads the host a fixed, small number of times (on a GPU each read is a sync
that stalls the queue): not once per loss term, layer or sample. Counted by wrapping every way
a tensor's value reaches Python (``item``, ``tolist``, ``__float__``, ``__int__``, ``__bool__``,
``__index__``) around ``Run.train_step``, with the batch drawn and patchified beforehand (data
loading is host work by nature) and the optimiser's step left out (torch's AdamW reads its
step counters, which live on the host even when the parameters are on a GPU)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def reads_in_a_step(registries, tmp_path, batch: int, depth: int, extra: tuple[str, ...] = ()) -> dict[str, int]:
    from atoken_core.recipe import load_recipe
    from atoken_core.train import Run

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries, [
        'model.flavor="test"', f"model.flavor_overrides={{depth = {depth}, decoder_depth = {depth}}}",
        "data.image.video_frames=0", "data.image.crop=32", f"stage[0].batch_size={batch}", "loss[1].max_side=32",
        "loss[2].max_side=32", 'data.image.train=["pkg://skimage/data/astronaut.png"]', *extra])
    run = Run(recipe, registries, str(tmp_path / f"r{batch}-{depth}-{len(extra)}"), progress=False)
    assert len(run.model.encoder) == depth
    source, modality = run.data["image"], run.modalities["image"]
    samples, texts = source.train_batch_part(batch, torch.Generator().manual_seed(0), 0, 1)
    tokens = modality.patchify(samples, run.model.spec)
    source.train_batch_part = lambda *args: (samples, texts)
    modality.patchify = lambda *args: tokens
    sites: dict[str, int] = {}
    counting = [True]
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrapped(name):
        def read(self, *args, **kwargs):
            if counting[0]:
                frame = traceback.extract_stack()[-2]
                where = f"{name} at {Path(frame.filename).name}:{frame.lineno}"
                sites[where] = sites.get(where, 0) + 1
            return originals[name](self, *args, **kwargs)
        return read

    step = run.optimizer.step

    def optimizer_step(*args, **kwargs):
        counting[0] = False
        try:
            return step(*args, **kwargs)
        finally:
            counting[0] = True

    run.optimizer.step = optimizer_step
    try:
        for name in READS:
            setattr(torch.Tensor, name, wrapped(name))
        row = run.train_step(0)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    assert row["finite"] and len(row["values"]) > 3  # the step ran, with several loss terms
    return sites


def test_a_training_step_reads_the_host_once(registries, tmp_path):
    counts = {(b, d): reads_in_a_step(registries, tmp_path, b, d) for b, d in ((2, 1), (4, 1), (2, 2))}
    for key, sites in counts.items():
        assert sum(sites.values()) == 1, (key, sites)  # is everything finite? (one all-reduce under torchrun)


def test_learned_positions_add_one_read_per_forward_not_per_sample(registries, tmp_path):
    grid = ("model.flavor_overrides.pos_embed_grid=4",)
    small, large = (sum(reads_in_a_step(registries, tmp_path, b, 1, grid).values()) for b in (2, 4))
    assert small == large == 2, (small, large)  # is everything finite? + the grid sizes of the batch


def test_the_counter_sees_a_read(registries, tmp_path, monkeypatch):
    """The counting can fail: a loss that reads its value on the host is caught."""
    from atoken_losses.pixel import L1Loss

    forward = L1Loss.forward

    def reading(self, inputs):
        terms = forward(self, inputs)
        float(terms["l1"].detach())
        return terms

    monkeypatch.setattr(L1Loss, "forward", reading)
    sites = reads_in_a_step(registries, tmp_path, 2, 1)
    assert sum(sites.values()) == 2 and any("test_host_reads.py" in s for s in sites), sites


@pytest.mark.parametrize("lengths", [(3, 3, 3), (2, 5, 5, 1)])
def test_packing_needs_no_device_read(lengths):
    """Moving a batch, replacing its features and grouping it for attention use the host copy of
    its offsets."""
    from atoken_core.model import AttentionGroups
    from atoken_core.sparse import Sparse4D

    parts = [Sparse4D.single(torch.randn(n, 4), torch.zeros(n, 4, dtype=torch.long)) for n in lengths]
    batch = Sparse4D.cat(parts)
    assert list(batch.offsets) == batch.cu_seqlens.tolist()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read")

    try:
        for name in READS:
            setattr(torch.Tensor, name, refuse)
        moved = batch.to("cpu").with_features(torch.zeros(batch.num_tokens, 2))
        groups = AttentionGroups.of(moved)
        halves = moved.split()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    assert [h.num_tokens for h in halves] == list(lengths)
    assert (groups.length is not None) == (len(set(lengths)) == 1)
