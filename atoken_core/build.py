"""Build the model and components a validated recipe names, through the registries."""

from __future__ import annotations

from typing import Any

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
    for name in sorted(recipe.data):  # modalities with their own output head (3D: Gaussians)
        out_dim = build_modality(recipe, registries, name).head_dim(model.spec)
        if out_dim is not None:
            model.add_head(name, out_dim)
    return model


def build_modality(recipe: Recipe, registries: Registries, name: str) -> Any:
    return registries["modality"].get(name).build(recipe.modality_config(registries, name))


def build_component(spec: ComponentSpec, kind: str, registries: Registries, **kwargs: Any) -> Any:
    return registries[kind].get(spec.kind).build(spec.config, **kwargs)


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
