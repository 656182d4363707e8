"""Build the model and components a validated recipe names, through the registries."""

from __future__ import annotations

from typing import Any

from atoken_core.errors import UserError
from atoken_core.model import AToken
from atoken_core.recipe import ComponentSpec, Recipe
from atoken_core.registry import Registries


def build_bottleneck(spec: ComponentSpec, registries: Registries, *, in_dim: int, latent_dim: int) -> Any:
    return registries["bottleneck"].get(spec.kind).build(spec.config, in_dim=in_dim, latent_dim=latent_dim)


def build_model(recipe: Recipe, registries: Registries, bottleneck: ComponentSpec | None = None,
                latent_dim: int | None = None) -> AToken:
    flavor = recipe.model.resolved_flavor()
    spec = bottleneck or recipe.bottleneck
    bottleneck_module = build_bottleneck(spec, registries, in_dim=flavor.width,
                                         latent_dim=latent_dim or recipe.model.latent_dim)
    model = AToken(flavor, bottleneck_module, shortcut=recipe.model.shortcut != "none")
    for name in sorted(recipe.data):
        add_modality(model, build_modality(recipe, registries, name))
    return model


def add_modality(model: AToken, modality: Any) -> None:
    """Give ``modality`` what it needs beyond the shared RGB patch embedding and pixel head: its
    own output head (3D: Gaussian parameters), and for pixels of another channel count its own
    input stem and a pixel head of ``t * p * p * channels`` outputs."""
    spec = model.spec
    out_dim = modality.head_dim(spec)
    if modality.channels != spec.channels:
        if modality.channels < 1:
            raise ValueError(f"modality {modality.name!r} declares {modality.channels} channels; needs at least 1")
        model.add_stem(modality.name, modality.channels)
        out_dim = out_dim or spec.temporal_patch * spec.patch_size ** 2 * modality.channels
    if out_dim is not None:
        model.add_head(modality.name, out_dim)


def checkpoint_modalities(recipe: Recipe) -> list[str]:
    """The modalities a recipe trains (any stage), sorted: what its checkpoints can encode."""
    return sorted({m for stage in recipe.stage for m in stage.modalities})


def build_modality(recipe: Recipe, registries: Registries, name: str) -> Any:
    return registries["modality"].get(name).build(recipe.modality_config(registries, name))


def build_component(spec: ComponentSpec, kind: str, registries: Registries, **kwargs: Any) -> Any:
    return registries[kind].get(spec.kind).build(spec.config, **kwargs)


def build_data(recipe: Recipe, registries: Registries, name: str, modality: Any) -> Any:
    """The data source of ``[data.NAME]``: ``factory(config)``, or ``factory(config, modality=...)``
    with the modality it feeds (configured as the recipe says) when the factory takes a
    ``modality`` argument, as pluggy passes a hook implementation only the arguments it names."""
    import inspect

    component = registries["data"].get(recipe.data[name].kind)
    factory = component.resolve()
    try:
        takes = "modality" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        takes = False
    config = recipe.data[name].config
    return factory(config, modality=modality) if takes else factory(config)


def model_from_checkpoint(path: str, registries: Registries) -> tuple[AToken, Recipe, dict[str, Any]]:
    """Rebuild a checkpoint's model from the recipe stored in its metadata (at the stage it was
    saved in), load its weights strictly, and return (model in eval mode, recipe, metadata)."""
    from atoken_core.checkpoint import load_model_state, read_checkpoint
    from atoken_core.recipe import recipe_from_dict

    tensors, meta = read_checkpoint(path)
    recipe = recipe_from_dict(meta["recipe"], registries, f"{path} (recipe in metadata)")
    plan = build_component(recipe.curriculum, "curriculum", registries).stages(recipe)[int(meta["state"].get("stage", 0))]
    model = build_model(recipe, registries, plan.bottleneck, plan.latent_dim)
    load_model_state(model, tensors, path)
    return model.eval(), recipe, meta


class ModalityCheckError(UserError, ValueError):
    pass


def check_modalities(recipe: Recipe, registries: Registries) -> list[str]:
    """:func:`check_modalities_run`, raising every problem at once; returns the modalities it could
    not check."""
    problems, unchecked = check_modalities_run(recipe, registries)
    if problems:
        raise ModalityCheckError("; ".join(problems))
    return unchecked


def check_modalities_run(recipe: Recipe, registries: Registries) -> tuple[list[str], list[str]]:
    """Send each trained modality's :meth:`~atoken_core.interfaces.Modality.example` through a tiny
    stand-in of the recipe's model on CPU (its flavour shrunk to width 16 and one block a side;
    patch size, temporal patch, positions, chunks, bottleneck kind and latent width as in the
    recipe) and back through ``unpatchify``; return (one line per modality that cannot run, naming
    it and what failed; the modalities that have no example to check).

    The recipe's own model cannot run on the meta device yet (packing reads token counts on the
    host), so the stand-in is what makes this cheap: the modality's side of the contract (its
    tokens' widths, its stem and head, its restored shapes) does not depend on width or depth."""
    import attrs
    import torch

    problems, unchecked = [], []
    flavor = recipe.model.resolved_flavor()
    tiny = attrs.evolve(flavor, width=16, heads=2, mlp=32, depth=1, decoder_depth=1,
                        text_dim=8 if flavor.text_dim else None)
    generator = torch.Generator().manual_seed(0)
    plans = build_component(recipe.curriculum, "curriculum", registries).stages(recipe)
    for name in sorted({m for plan in plans for m in plan.modalities}):
        modality = build_modality(recipe, registries, name)
        bottleneck = build_bottleneck(plans[0].bottleneck, registries, in_dim=tiny.width, latent_dim=plans[0].latent_dim)
        model = AToken(tiny, bottleneck)
        where = f"modality {name!r} ({type(modality).__module__}.{type(modality).__qualname__})"
        try:
            add_modality(model, modality)
            example = modality.example(model.spec, generator)
            if example is None:
                unchecked.append(name)
                continue
            target = modality.targets([example], model.spec)[0]
            tokens = modality.patchify([example], model.spec)
            with torch.no_grad():
                recon, _ = model.eval()(tokens.patches, sample=False, head=name if name in model.heads else None)
            restored = modality.unpatchify(tokens.patches.with_features(recon.float()), tokens.meta, model.spec)[0]
            if tuple(restored.shape) != tuple(target.shape):
                problems.append(f"{where}: decodes its example to shape {tuple(restored.shape)}, but its targets "
                                f"have shape {tuple(target.shape)}")
            modality.preview(target)
        except Exception as err:  # any failure, reported with the modality's name
            problems.append(f"{where}: cannot run through the model: {type(err).__name__}: {err}")
    return problems, unchecked
