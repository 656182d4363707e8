"""The recipe schema: what a ``recipes/*.toml`` file may say, field by field.

Components a user could swap (bottleneck, losses, data sources, curriculum, modalities)
are given as tables with a ``kind``; the rest of the table is that component's own config,
checked against the attrs class its plugin registered. :func:`load_recipe` resolves every
``kind`` and structures every table without building anything, and reports all problems
in one message.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from typing import Any

import attrs
import fsspec

from atoken_core.config import ConfigError, apply_override, load_toml, structure, unstructure
from atoken_core.flavors import FLAVORS, Flavor, resolve_flavor
from atoken_core.registry import Registries, RegistryError

def doc(text: str, **kwargs: Any) -> Any:
    """An attrs field with its documentation kept in metadata (shown by ``atoken validate``)."""
    return attrs.field(metadata={"doc": text}, **kwargs)


@attrs.define(kw_only=True)
class ComponentSpec:
    """A ``{kind = "...", ...}`` table: the registry name plus that component's own settings."""

    kind: str = doc("registry name of the component (see `atoken plugins`)")
    params: dict[str, Any] = doc("the rest of the table, checked against the component's config", factory=dict)
    config: Any = doc("structured config (filled by validation)", default=None, eq=False)


@attrs.define(kw_only=True)
class LossSpec(ComponentSpec):
    weight: float = doc("multiplier on every term this loss returns", default=1.0)
    modalities: list[str] | None = doc("modalities this loss applies to (default: all)", default=None)


def _known_flavor(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in FLAVORS:
        raise ValueError(f"'{attribute.name}' must be one of {', '.join(FLAVORS)}; got {value!r}")


INIT_KINDS = ("siglip2:", "checkpoint:")


def _check_init(attribute: attrs.Attribute, value: str) -> None:
    if value and not any(value.startswith(kind) and len(value) > len(kind) for kind in INIT_KINDS):
        raise ValueError(f"'{attribute.name}' must be '', 'siglip2:PATH' or 'checkpoint:PATH', got {value!r}")


@attrs.define(kw_only=True)
class ModelConfig:
    flavor: str = doc("named size preset from atoken_core.flavors.FLAVORS", default="tiny", validator=_known_flavor)
    flavor_overrides: dict[str, Any] = doc(
        "fields of the flavour replaced for this recipe (names and types as in atoken_core.flavors.Flavor), "
        "e.g. {width = 32, depth = 2, decoder_depth = 2, heads = 2, mlp = 80}", factory=dict)
    latent_dim: int | None = doc(
        "channels of the reconstruction latent z_r (32 in stage 1, 48 from stage 2); default: the flavour's "
        "(flavours of released weights fix it), else 32", default=None,
        validator=attrs.validators.optional(attrs.validators.ge(1)))
    init: str = doc(
        "'' (random initialisation), 'siglip2:PATH': import a Hugging Face SigLIP2 vision tower into the "
        "encoder, or 'checkpoint:PATH': start from every weight of an atoken checkpoint of the same "
        "architecture (e.g. one written by atoken import-official); local file or fsspec URI, loaded before "
        "the first step",
        default="", validator=lambda _, attribute, value: _check_init(attribute, value),
    )
    shortcut: str = doc(
        "'none' (the paper's pure transformer) or 'pca': a linear pixels<->latent path beside the "
        "transformer, started at the PCA solution of the training patches",
        default="none", validator=attrs.validators.in_(["none", "pca"]),
    )

    def resolved_flavor(self) -> Flavor:
        """The flavour with this recipe's ``flavor_overrides`` applied (validated by :func:`validate`)."""
        return resolve_flavor(self.flavor, self.flavor_overrides)


@attrs.define(kw_only=True)
class OptimConfig:
    lr: float = doc("peak learning rate", default=3e-4)
    betas: list[float] = doc("AdamW betas", factory=lambda: [0.9, 0.95])
    weight_decay: float = doc("AdamW decoupled weight decay", default=0.1)
    warmup_steps: int = doc("linear warm-up steps at the start of each stage", default=0)
    min_lr_ratio: float = doc("cosine schedule floor as a fraction of lr", default=0.1)
    grad_clip: float = doc("max global gradient norm (0 disables)", default=1.0)
    encoder_lr_scale: float = doc("learning-rate multiplier for the encoder (the paper: 0.1 for a pretrained "
                                  "SigLIP2 encoder)", default=1.0)
    ema_decay: float = doc("exponential moving average of the weights, used for evaluation and exported "
                           "(0 disables; e.g. 0.999)", default=0.0,
                           validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)])


@attrs.define(kw_only=True)
class StageConfig:
    name: str = doc("stage name, used in logs and checkpoint names")
    steps: int = doc("optimiser steps in this stage", validator=attrs.validators.ge(1))
    modalities: list[str] = doc("modalities trained in this stage (round-robin); default: every [data.NAME] table's",
                                factory=list)
    batch_size: int = doc("samples per modality per step", default=8, validator=attrs.validators.ge(1))
    weights: dict[str, float] = doc("loss multiplier per modality in this stage's round robin (default 1 each), "
                                    "e.g. {image = 1.0, video = 0.5}", factory=dict)
    lr: float | None = doc("overrides optim.lr for this stage", default=None)
    bottleneck: ComponentSpec | None = doc("overrides the recipe's bottleneck from this stage on", default=None)
    latent_dim: int | None = doc(
        "grows the latent from this stage on (e.g. 32 -> 48); the new channels start silent so the "
        "previous stage's reconstructions are unchanged at the switch", default=None,
    )


@attrs.define(kw_only=True)
class LogConfig:
    every: int = doc("log metrics every N steps", default=10, validator=attrs.validators.ge(1))
    checkpoint_every: int = doc("write a checkpoint every N steps (and at the end)", default=100)
    keep_checkpoints: int = doc("how many step checkpoints to keep (the final one is always kept)", default=2)
    progress: bool = doc("show a progress bar", default=True)
    tensorboard: bool = doc("also write TensorBoard event files under tb/ (when the tensorboard package is "
                            "installed and the output folder is local)", default=True)


@attrs.define(kw_only=True)
class EvalConfig:
    grid_images: int = doc("held-out images shown in each reconstruction grid", default=4)
    pca_baseline: bool = doc("also report PCA of the patches at the same latent size", default=True)
    max_side: int = doc("held-out images are resized so the longer side is at most this", default=640)
    every: int = doc("evaluate and write reconstruction grids every N steps (0: at the start and end only)",
                     default=0, validator=attrs.validators.ge(0))


@attrs.define(kw_only=True)
class ParallelConfig:
    mixed_precision: str = doc("'none' (fp32) or 'bf16' (bf16 compute, fp32 weights and gradient reduction; "
                               "FSDP2's policy under torchrun, autocast on a single GPU)", default="none",
                               validator=attrs.validators.in_(["none", "bf16"]))
    activation_checkpointing: bool = doc("recompute each transformer block in the backward pass "
                                         "(less activation memory, ~1/3 more compute)", default=False)
    compile: bool = doc("torch.compile every transformer block", default=False)


@attrs.define(kw_only=True)
class Recipe:
    name: str = doc("run name")
    seed: int = doc("seeds model init, data order and sampling", default=0)
    output_dir: str = doc("where the run writes (fsspec path or URI); '{name}' is substituted", default="runs/{name}")
    model: ModelConfig = doc("the transformer", factory=ModelConfig)
    bottleneck: ComponentSpec = doc("the reconstruction bottleneck (kl or fsq)")
    loss: list[LossSpec] = doc("[[loss]] blocks: each a registered loss with a weight")
    modality: dict[str, dict[str, Any]] = doc("[modality.NAME] settings per modality", factory=dict)
    data: dict[str, ComponentSpec] = doc("[data.MODALITY]: the data source for each modality")
    curriculum: ComponentSpec = doc(
        "orders the stages", factory=lambda: ComponentSpec(kind="sequential")
    )
    optim: OptimConfig = doc("optimiser and schedule", factory=OptimConfig)
    stage: list[StageConfig] = doc("[[stage]] blocks, run in order by the curriculum")
    log: LogConfig = doc("logging and checkpoints", factory=LogConfig)
    eval: EvalConfig = doc("held-out evaluation", factory=EvalConfig)
    parallel: ParallelConfig = doc("precision, activation checkpointing, compilation (and FSDP2 under torchrun)",
                                   factory=ParallelConfig)

    def resolved_output_dir(self) -> str:
        return self.output_dir.replace("{name}", self.name)

    def modality_config(self, registries: Registries, name: str) -> Any:
        component = registries["modality"].get(name)
        return structure(self.modality.get(name, {}), component.config, f"modality.{name}")


# cattrs: a component table is {kind = ..., **params}; the params stay raw until validation.
def _structure_component(cls: type):
    own = {f.name for f in attrs.fields(cls)} - {"kind", "params", "config"}

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected a table with a 'kind', got {value!r}")
        if "kind" not in value:
            raise KeyError("kind")
        if not isinstance(value["kind"], str):
            raise TypeError(f"'kind' must be a string, got {value['kind']!r}")
        kwargs = {k: value[k] for k in own if k in value}
        params = {k: v for k, v in value.items() if k not in own and k != "kind"}
        return cls(kind=value["kind"], params=params, **kwargs)

    return hook


def _register_component_hooks() -> None:
    from atoken_core.config import converter

    for cls in (ComponentSpec, LossSpec):
        converter.register_structure_hook(cls, _structure_component(cls))
        converter.register_unstructure_hook(
            cls,
            lambda spec, cls=cls: {
                "kind": spec.kind,
                **{f.name: converter.unstructure(getattr(spec, f.name)) for f in attrs.fields(cls)
                   if f.name not in ("kind", "params", "config") and getattr(spec, f.name) is not None},
                **copy.deepcopy(spec.params),
            },
        )


_register_component_hooks()


def _check_component(spec: ComponentSpec, kind: str, path: str, registries: Registries, problems: list[str]) -> None:
    try:
        component = registries[kind].get(spec.kind)
    except RegistryError as err:
        problems.append(f"{path}.kind: {err}")
        return
    try:
        spec.config = structure(spec.params, component.config, path)
    except ConfigError as err:
        problems.extend(err.problems)


def _check_own_fields(spec: ComponentSpec, path: str, problems: list[str]) -> None:
    """The generic fields of a component table (a loss's weight, modalities) arrive raw from the
    component hook; structure them with the same strict converter as the rest of the recipe."""
    for field in attrs.fields(attrs.resolve_types(type(spec))):
        if field.name in ("kind", "params", "config"):
            continue
        try:
            setattr(spec, field.name, structure(getattr(spec, field.name), field.type, f"{path}.{field.name}"))
        except ConfigError as err:
            problems.extend(err.problems)


def _check_flavor(recipe: Recipe, problems: list[str]) -> Flavor | None:
    """Type-check ``model.flavor_overrides`` field by field, then build the flavour (its own
    validators run); the flavour, or None when it cannot be built."""
    model = recipe.model
    if model.flavor not in FLAVORS:
        return None  # reported by ModelConfig's validator
    fields = {f.name: f for f in attrs.fields(attrs.resolve_types(Flavor))}
    typed, ok = {}, True
    for key, value in model.flavor_overrides.items():
        where = f"model.flavor_overrides.{key}"
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            problems.append(f"{where}: not a flavour field" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            ok = False
            continue
        try:
            typed[key] = structure(value, fields[key].type, where)
        except ConfigError as err:
            problems.extend(err.problems)
            ok = False
    if not ok:
        return None
    try:
        flavor = resolve_flavor(model.flavor, typed)
    except (ValueError, TypeError) as err:
        problems.append(f"model.flavor_overrides: {err}")
        return None
    model.flavor_overrides = typed
    return flavor


def _check_released_weights_layout(recipe: Recipe, flavor: Flavor, problems: list[str]) -> None:
    """Flavours of released weights fix the first stage's latent width and bottleneck."""
    name = recipe.model.flavor
    if flavor.latent_dim is not None:
        if recipe.model.latent_dim is None:
            recipe.model.latent_dim = flavor.latent_dim
        elif recipe.model.latent_dim != flavor.latent_dim:
            problems.append(f"model.latent_dim: flavour {name!r} has a {flavor.latent_dim}-channel latent, "
                            f"got {recipe.model.latent_dim}")
    spec = recipe.bottleneck
    if flavor.bottleneck is not None and spec.kind != flavor.bottleneck:
        problems.append(f"bottleneck.kind: flavour {name!r} uses {flavor.bottleneck!r}, got {spec.kind!r}")
    elif spec.config is not None:
        def plain(value: Any) -> Any:  # TOML gives lists where a flavour holds tuples
            return list(value) if isinstance(value, (list, tuple)) else value

        for key, want in flavor.bottleneck_settings:
            have = getattr(spec.config, key, None)
            if plain(have) != plain(want):
                problems.append(f"bottleneck.{key}: flavour {name!r} needs {want!r}, got {have!r}")


def validate(recipe: Recipe, registries: Registries) -> Recipe:
    """Resolve every ``kind`` and structure every component table; raise all problems at once."""
    problems: list[str] = []
    _check_component(recipe.bottleneck, "bottleneck", "bottleneck", registries, problems)
    flavor = _check_flavor(recipe, problems)
    if flavor is not None:
        _check_released_weights_layout(recipe, flavor, problems)
    if recipe.model.latent_dim is None:
        recipe.model.latent_dim = 32
    for i, spec in enumerate(recipe.loss):
        _check_own_fields(spec, f"loss[{i}]", problems)
        _check_component(spec, "loss", f"loss[{i}]", registries, problems)
    _check_component(recipe.curriculum, "curriculum", "curriculum", registries, problems)
    for st in recipe.stage:
        if not st.modalities:
            st.modalities = sorted(recipe.data)
    used = sorted({m for st in recipe.stage for m in st.modalities})
    for name in sorted(set(recipe.modality) | set(used)):
        if name not in registries["modality"]:
            where = f"modality.{name}" if name in recipe.modality else "stage[].modalities"
            problems.append(f"{where}: {registries['modality'].unknown_message(name)}")
            continue
        try:
            recipe.modality_config(registries, name)
        except ConfigError as err:
            problems.extend(err.problems)
    for name, spec in recipe.data.items():
        _check_component(spec, "data", f"data.{name}", registries, problems)
    for i, st in enumerate(recipe.stage):
        for name in st.modalities:
            if name not in recipe.data:
                problems.append(f"stage[{i}].modalities: {name!r} has no [data.{name}] table")
        for name in st.weights:
            if name not in st.modalities:
                problems.append(f"stage[{i}].weights: {name!r} is not one of this stage's modalities {st.modalities}")
        if st.bottleneck is not None:
            _check_component(st.bottleneck, "bottleneck", f"stage[{i}].bottleneck", registries, problems)
    latent = recipe.model.latent_dim
    for i, st in enumerate(recipe.stage):
        if st.latent_dim is not None:
            if st.latent_dim < latent:
                problems.append(f"stage[{i}].latent_dim: {st.latent_dim} is smaller than the {latent} before it; "
                                "a latent can only grow")
            latent = st.latent_dim
    if not recipe.stage:
        problems.append("stage: a recipe needs at least one [[stage]] block")
    if problems:
        raise ConfigError(problems)
    return recipe


def recipe_from_dict(data: dict[str, Any], registries: Registries, source: str | None = None) -> Recipe:
    try:
        recipe = structure(data, Recipe)
        return validate(recipe, registries)
    except ConfigError as err:
        raise ConfigError(err.problems, source) from None


def load_recipe(path: str, registries: Registries, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe (any fsspec path), apply ``--set`` overrides, validate everything."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(["recipe file not found"], path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"cannot read recipe: {err}"], path) from None
    data = load_toml(text, path)
    for assignment in overrides:
        try:
            apply_override(data, assignment)
        except ConfigError as err:
            raise ConfigError(err.problems, path) from None
    return recipe_from_dict(data, registries, path)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return unstructure(recipe)
