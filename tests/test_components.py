"""Tests over every registered component (timm's habit of testing every model in its registry):
each builds at a tiny size, runs forward and backward, gives every parameter it owns a
gradient, and keeps the protocols the core relies on. A new plugin's components are picked
up here without a new test. Plus the core's boundary: it imports no first-party plugin and
names no registered modality, loss, teacher or data source."""

from __future__ import annotations

import ast
from pathlib import Path

import attrs
import pytest
import torch

from atoken_core.plugin_manager import get_registries

from conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("atoken_modalities", "atoken_losses", "atoken_bottlenecks", "atoken_teachers", "atoken_official")
_REGISTRIES = get_registries()


def _names(kind: str) -> list[str]:
    return sorted(_REGISTRIES[kind])


def _config(component):
    """A component's config at its defaults; a required ``teacher`` gets the seeded stand-in."""
    fields = attrs.fields_dict(component.config)
    required = {"teacher": "random"} if "teacher" in fields else {}
    return component.config(**required)


# ----------------------------------------------------------------------------- core boundary
def _core_files() -> list[Path]:
    return sorted((ROOT / "atoken_core").glob("*.py"))


def test_core_imports_no_first_party_plugin():
    found = []
    for path in _core_files():
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] in FIRST_PARTY]
    assert not found, "\n".join(found)


def _code_strings(path: Path):
    """(line, value) of every string constant in ``path`` except docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_core_names_no_registered_modality_loss_teacher_or_dataset():
    # A loss name that is also a bottleneck's ("kl") is left out: flavours of released weights name
    # their bottleneck, which the core may.
    names = {n: kind for kind in ("modality", "loss", "teacher", "data") for n in _names(kind)
             if n not in _REGISTRIES["bottleneck"]}
    found = [f"{path.name}:{line} names {names[value]} {value!r}"
             for path in _core_files() for line, value in _code_strings(path) if value in names]
    assert not found, "\n".join(found)


def test_the_boundary_check_finds_a_named_modality(tmp_path):
    """The check above can fail: a core-like file naming a modality is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""doc naming image is fine"""\nif modality == "video":\n    pass\n')
    assert [v for _, v in _code_strings(bad)] == ["video"]


# ----------------------------------------------------------------------------- modalities
@pytest.mark.parametrize("name", _names("modality"))
def test_every_modality_runs_its_example_forward_and_backward(name, registries):
    from atoken_core.build import add_modality

    component = registries["modality"].get(name)
    modality = component.build(_config(component))
    assert modality.name == name and set(modality.subspace) <= {"t", "x", "y", "z"}
    assert isinstance(modality.noun, str) and modality.channels >= 1
    model = make_model(registries)
    add_modality(model, modality)
    example = modality.example(model.spec, torch.Generator().manual_seed(0))
    if example is None:
        pytest.skip(f"modality {name!r} defines no example")
    target = modality.targets([example], model.spec)[0]
    tokens = modality.patchify([example], model.spec)
    assert tokens.patches.coords.shape[1] == 4 and tokens.patches.batch_size == 1
    assert modality.num_tokens(tuple(example.shape), model.spec) == tokens.patches.features.shape[0] \
        if torch.is_tensor(example) else True
    head = name if name in model.heads else None
    recon, _ = model(tokens.patches, sample=True, head=head)
    restored = modality.unpatchify(tokens.patches.with_features(recon), tokens.meta, model.spec)[0]
    assert restored.shape == target.shape
    (restored - target).abs().mean().backward()
    used = [model.patch_embed_of(head), model.encoder, model.bottleneck, model.decoder,
            model.heads[head] if head else model.pixel_head]
    missing = [n for part in used for n, p in part.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    preview = modality.preview(target)
    assert preview.shape[-3] == 3 and preview.ndim in (3, 4)
    figure = modality.figure(target, restored.detach())
    assert figure.ndim == 3 and figure.shape[0] == 3


def test_a_non_rgb_modality_gets_its_own_stem_and_head(registries):
    """A modality declaring 1 channel gets a 1-channel patch embedding and pixel head on the shared
    transformer; the RGB ones are untouched."""
    from atoken_core.build import add_modality

    component = registries["modality"].get("image")

    class Grey(type(component.build(component.config()))):
        name = "grey"
        channels = 1

    model = make_model(registries)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_modality(model, Grey(component.config()))
    p, t = model.spec.patch_size, model.spec.temporal_patch
    assert model.stems["grey"].spec.channels == 1 and model.heads["grey"].out_features == t * p * p
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


# ----------------------------------------------------------------------------- bottlenecks
@pytest.mark.parametrize("name", _names("bottleneck"))
def test_every_bottleneck_trains_and_keeps_its_protocol(name, registries):
    from atoken_core.interfaces import Bottleneck, Discrete

    component = registries["bottleneck"].get(name)
    bottleneck = component.build(_config(component), in_dim=16, latent_dim=12)
    assert isinstance(bottleneck, Bottleneck) and bottleneck.latent_dim == 12
    features = torch.randn(5, 16, requires_grad=True)
    out = bottleneck(features, sample=True)
    assert out.latent.shape == (5, 12)
    loss = out.latent.square().mean()
    posterior = out.aux.get("posterior")
    if posterior is not None:  # the log-variance is trained through sampling and the KL term
        loss = loss + posterior.kl().mean()
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    unused = [n for n, p in bottleneck.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{name}: no gradient for {unused}"
    if bottleneck.discrete:
        assert isinstance(bottleneck, Discrete), f"{name}: discrete, but no latent_to_codes / codebook_size"
        assert out.codes is not None
        assert torch.equal(bottleneck.latent_to_codes(bottleneck.codes_to_latent(out.codes)), out.codes)
    with torch.no_grad():
        assert torch.equal(bottleneck.encode_project(features), bottleneck.encode_project(features))


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", _names("loss"))
def test_every_loss_gives_the_reconstruction_a_gradient(name, registries):
    from atoken_core.interfaces import Loss, LossInputs

    component = registries["loss"].get(name)
    loss = component.build(_config(component))
    assert isinstance(loss, Loss)
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    recon = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    bottleneck = make_model(registries).bottleneck(torch.randn(4, 32), sample=True)
    semantic = torch.randn(2, 64, requires_grad=True) if loss.needs_semantic else None
    inputs = LossInputs("image", target, recon, bottleneck, semantic=semantic,
                        texts=["a photo of a cat.", "a photo of a dog."])
    try:
        terms = loss(inputs)
    except Exception as err:  # a teacher whose width differs from the stand-in's
        if loss.needs_semantic and "dim" in str(err):
            semantic = torch.randn(2, _teacher_dim(loss), requires_grad=True)
            terms = loss(attrs.evolve(inputs, semantic=semantic, cache={}))
        else:
            raise
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    reached = [t for t in (recon, semantic) if t is not None and t.grad is not None and t.grad.abs().sum() > 0]
    if name != "kl":  # KL reads only the bottleneck's posterior
        assert reached, f"{name}: its terms reach neither the reconstruction nor the semantic embedding"
    unused = [n for n, p in loss.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{name}: no gradient for its own parameters {unused}"


def _teacher_dim(loss) -> int:
    return next(v for k, v in vars(loss).items() if k == "_teacher").embed_dim


# ----------------------------------------------------------------------------- curricula, teachers
@pytest.mark.parametrize("name", _names("curriculum"))
def test_every_curriculum_orders_the_recipe_stages(name, registries):
    from atoken_core.interfaces import Curriculum
    from atoken_core.recipe import load_recipe

    recipe = load_recipe(str(ROOT / "recipes" / "tiny-curriculum.toml"), registries, [f'curriculum={{kind = "{name}"}}'])
    curriculum = registries["curriculum"].get(name).build(recipe.curriculum.config)
    assert isinstance(curriculum, Curriculum)
    plans = curriculum.stages(recipe)
    assert plans and sum(p.steps for p in plans) == sum(s.steps for s in recipe.stage)
    for plan in plans:
        for step in range(min(plan.steps, 4)):
            assert set(curriculum.modality_schedule(plan, step)) <= set(plan.modalities)


@pytest.mark.parametrize("name", _names("teacher"))
def test_every_teacher_embeds_images_and_texts_frozen(name, registries):
    from atoken_core.interfaces import Teacher

    component = registries["teacher"].get(name)
    required = [f.name for f in attrs.fields(component.config) if f.default is attrs.NOTHING]
    if required:
        pytest.skip(f"teacher {name!r} needs {', '.join(required)} (real weights; tested in test_teachers.py)")
    teacher = component.build(component.config()).freeze()
    assert isinstance(teacher, Teacher)
    images = torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1
    image_emb, text_emb = teacher.encode_image(images), teacher.encode_text(["a cat", "a dog", "a car"])
    assert image_emb.shape == (2, teacher.embed_dim) and text_emb.shape == (3, teacher.embed_dim)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.train().training
