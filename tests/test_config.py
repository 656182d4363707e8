"""Recipes: strict structuring, errors with TOML paths, --set overrides, shipped recipes."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from atoken_core.config import ConfigError, apply_override, parse_path
from atoken_core.recipe import load_recipe, recipe_from_dict, recipe_to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
BASE = tomllib.loads((ROOT / "recipes" / "tiny.toml").read_text())


def problems_of(data, registries) -> list[str]:
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data, registries, "r.toml")
    return err.value.problems


def edited(**changes):
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        apply_override(data, f"{key.replace('__', '.')}={value}")
    return data


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, registries):
    recipe = load_recipe(str(path), registries)
    assert recipe.stage
    first = path.read_text().splitlines()[0]
    assert first.startswith("# atoken run recipes/"), "a recipe starts with the command that runs it"


def test_stage_override_type_error_has_toml_path(registries):
    data = copy.deepcopy(BASE)
    data["stage"].append({"name": "fsq", "steps": 5, "bottleneck": {"kind": "fsq", "levels": "8,5,5"}})
    assert problems_of(data, registries) == ["stage[1].bottleneck.levels: expected list[int], got '8,5,5'"]


def test_typo_key_suggests_field(registries):
    data = copy.deepcopy(BASE)
    data["model"]["flavour"] = "tiny"
    (problem,) = problems_of(data, registries)
    assert problem.startswith("model: unknown key 'flavour' (did you mean 'flavor'?)")


def test_typo_in_component_params_uses_component_config(registries):
    data = copy.deepcopy(BASE)
    data["bottleneck"]["logvar_inti"] = 0.0
    (problem,) = problems_of(data, registries)
    assert problem.startswith("bottleneck: unknown key 'logvar_inti' (did you mean 'logvar_init'?)")


def test_unknown_kind_lists_registered(registries):
    data = copy.deepcopy(BASE)
    data["loss"][1]["kind"] = "lpip"
    (problem,) = problems_of(data, registries)
    assert problem.startswith("loss[1].kind: unknown loss 'lpip' (did you mean 'lpips'?)")


def test_no_silent_coercion(registries):
    probs = problems_of(edited(stage__0__steps='"40"', model__latent_dim="3.5", optim__lr="true"), registries)
    assert "stage[0].steps: expected int, got '40'" in probs
    assert "model.latent_dim: expected int, got 3.5" in probs
    assert "optim.lr: expected float, got True" in probs


def test_all_problems_reported_at_once(registries):
    data = edited(model__flavor='"huge"', stage__0__batch_size="0")
    data["data"]["image"]["crop"] = "big"
    probs = problems_of(data, registries)
    from atoken_core.flavors import FLAVORS

    assert f"model.flavor: invalid value: must be one of {', '.join(FLAVORS)}; got 'huge'" in probs
    assert "stage[0].batch_size: invalid value: must be >= 1: 0" in probs
    assert len(probs) == 2
    # component tables are checked once the recipe's own structure is sound
    data = edited(stage__0__steps="3")
    data["data"]["image"]["crop"] = "big"
    data["loss"][0]["kind"] = "L1"
    assert problems_of(data, registries)[:2] == [
        "loss[0].kind: unknown loss 'L1' (did you mean 'l1'?); registered: " + ", ".join(registries["loss"]),
        "data.image.crop: expected int, got 'big'",
    ]


def test_missing_required_and_data_for_modality(registries):
    data = copy.deepcopy(BASE)
    del data["bottleneck"]
    data["data"] = {}
    probs = problems_of(data, registries)
    assert "bottleneck: required key is missing" in probs


def test_stage_without_data_table(registries):
    data = copy.deepcopy(BASE)
    data["data"] = {}
    assert "stage[0].modalities: 'image' has no [data.image] table" in problems_of(data, registries)


def test_set_overrides_and_paths(registries, tmp_path):
    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries,
                         ["stage[0].steps=7", "bottleneck.logvar_init=-2", "data.image.crop=64", "name=x"])
    assert recipe.stage[0].steps == 7 and recipe.data["image"].config.crop == 64 and recipe.name == "x"
    assert recipe.bottleneck.config.logvar_init == -2.0
    assert parse_path("stage[1].bottleneck.levels") == ["stage", 1, "bottleneck", "levels"]
    with pytest.raises(ConfigError, match=r"index \[5\] does not exist"):
        load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries, ["stage[5].steps=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries, ["stage"])


def test_bad_files(registries, tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: recipe file not found"):
        load_recipe(str(tmp_path / "nope.toml"), registries)
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_recipe(str(bad), registries)


def test_round_trip_through_metadata(registries):
    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries)
    again = recipe_from_dict(recipe_to_dict(recipe), registries)
    assert recipe_to_dict(again) == recipe_to_dict(recipe)
    assert [s.config for s in again.loss] == [s.config for s in recipe.loss]


def test_latent_can_only_grow(registries):
    data = copy.deepcopy(BASE)
    data["stage"].append({"name": "s2", "steps": 1, "latent_dim": 48})
    data["stage"].append({"name": "s3", "steps": 1, "latent_dim": 40})
    assert problems_of(data, registries) == ["stage[2].latent_dim: 40 is smaller than the 48 before it; "
                                             "a latent can only grow"]


def test_encoder_learning_rate_scale(registries, tmp_path):
    from atoken_core.train import Run

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries, [
        "model.flavor=\"test\"", "data.image.video_frames=0", "optim.encoder_lr_scale=0.1", "optim.lr=0.002",
        "optim.warmup_steps=0", "data.image.train=[\"pkg://skimage/data/astronaut.png\"]"])
    run = Run(recipe, registries, str(tmp_path / "r"), progress=False)
    run.train_step(0)
    encoder_ids = {id(p) for name, p in run.model.named_parameters() if name.startswith(("patch_embed", "encoder.", "encoder_norm"))}
    for group in run.optimizer.param_groups:
        on_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert len(on_encoder) == 1, "a group is all encoder or all not"
        assert group["lr"] == pytest.approx(0.002 * (0.1 if on_encoder.pop() else 1.0))
    for group in run.optimizer.param_groups:  # matrices decay, vectors (norms, biases) do not
        assert {p.ndim >= 2 for p in group["params"]} == {group["weight_decay"] > 0}


def test_positions_and_the_pooling_probe_take_no_weight_decay(registries, tmp_path):
    from atoken_core.train import Run

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries, [
        "model.flavor=\"test-siglip\"", "data.image.video_frames=0", "optim.weight_decay=0.05",
        "data.image.train=[\"pkg://skimage/data/astronaut.png\"]"])
    run = Run(recipe, registries, str(tmp_path / "r"), progress=False)
    params = dict(run.model.named_parameters())
    assert {"pos_embed", "pool_head.probe"} <= set(params) and params["pos_embed"].ndim == 2
    decay = {id(p): group["weight_decay"] for group in run.optimizer.param_groups for p in group["params"]}
    assert decay[id(params["pos_embed"])] == 0 and decay[id(params["pool_head.probe"])] == 0
    assert decay[id(params["encoder.0.attn.qkv.weight"])] == 0.05


def test_generic_loss_fields_are_checked_like_the_rest(registries):
    assert problems_of(edited(loss__0__weight='"x"'), registries) == ["loss[0].weight: expected float, got 'x'"]
    assert problems_of(edited(loss__1__modalities='"image"'), registries) == [
        "loss[1].modalities: expected list[str], got 'image'"]
    assert problems_of(edited(loss__1__modalities='["image", 3]'), registries) == [
        "loss[1].modalities[1]: expected str, got 3"]


def test_stage_weights_name_the_stages_modalities(registries):
    data = copy.deepcopy(BASE)
    data["stage"][0]["weights"] = {"video": 0.5}
    assert problems_of(data, registries) == ["stage[0].weights: 'video' is not one of this stage's modalities ['image']"]
    data["stage"][0]["weights"] = {"image": "half"}
    assert problems_of(data, registries) == ["stage[0].weights.image: expected float, got 'half'"]


def test_flavours_of_released_weights_fix_the_first_latent_and_bottleneck(registries):
    # atoken-so-d's weights are an FSQ over a bias-free KL projection with a 48-channel latent;
    # a recipe that says otherwise is refused at validate, every difference named.
    data = edited(model__flavor='"atoken-so-d"', bottleneck='{kind = "fsq", levels = [8, 8, 8, 5, 5, 5]}')
    probs = problems_of(data, registries)
    assert "model.latent_dim: flavour 'atoken-so-d' has a 48-channel latent, got 32" in probs
    assert "bottleneck.bias: flavour 'atoken-so-d' needs False, got True" in probs
    assert "bottleneck.levels: flavour 'atoken-so-d' needs (4, 4, 4, 4, 4, 4), got [8, 8, 8, 5, 5, 5]" in probs
    assert "bottleneck.logvar_rows: flavour 'atoken-so-d' needs True, got False" in probs
    data = edited(model__flavor='"atoken-so-c"', bottleneck='{kind = "kl", bias = false}')
    del data["model"]["latent_dim"]  # taken from the flavour
    assert recipe_from_dict(data, registries).model.latent_dim == 48
    data["bottleneck"] = {"kind": "fsq"}
    assert "bottleneck.kind: flavour 'atoken-so-c' uses 'kl', got 'fsq'" in problems_of(data, registries)


def test_flavor_overrides_are_checked_field_by_field(registries):
    data = edited(model__flavor_overrides='{width = 48, heads = 5, detph = 2, decoder_norm = 3}')
    probs = problems_of(data, registries)
    assert "model.flavor_overrides.detph: not a flavour field (did you mean 'depth'?)" in probs
    assert "model.flavor_overrides.decoder_norm: expected str, got 3" in probs
    data = edited(model__flavor_overrides='{width = 48, heads = 5}')
    assert problems_of(data, registries) == ["model.flavor_overrides: width 48 is not a multiple of heads 5"]
    data = edited(model__flavor_overrides='{width = 96, depth = 1}')
    assert recipe_from_dict(data, registries).model.resolved_flavor().width == 96


def test_model_init_names_its_kind(registries):
    probs = problems_of(edited(model__init='"ckpt:/x.safetensors"'), registries)
    assert probs == ["model.init: invalid value: must be '', 'siglip2:PATH' or 'checkpoint:PATH', "
                     "got 'ckpt:/x.safetensors'"]
    assert recipe_from_dict(edited(model__init='"checkpoint:/x.safetensors"'), registries).model.init


def test_a_crash_keeps_the_rows_logged_since_the_last_checkpoint(registries, tmp_path, monkeypatch):
    """Rows wait for the next checkpoint to be written; a crash in between still writes them (a
    resume truncates rows past its checkpoint, so nothing is logged twice)."""
    import json

    from atoken_core.train import Run

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"), registries, [
        "model.flavor=\"test\"", "data.image.video_frames=0", "data.image.crop=32", "stage[0].batch_size=2",
        "stage[0].steps=10", "log.every=1", "log.checkpoint_every=10", "eval.pca_baseline=false",
        "eval.max_side=32", "loss=[{kind = \"l1\"}]", "data.image.train=[\"pkg://skimage/data/astronaut.png\"]"])
    run = Run(recipe, registries, str(tmp_path / "r"), progress=False)
    step = run.train_step

    def failing(i):
        if i == 3:
            raise RuntimeError("a data source broke")
        return step(i)

    monkeypatch.setattr(run, "train_step", failing)
    with pytest.raises(RuntimeError, match="a data source broke"):
        run.run()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
