"""Convert a checkpoint of Apple's AToken release into an atoken checkpoint.

Facts used here were read from github.com/apple/ml-atoken (commit 3f5afdc) and checked by
running it: ``tests/official/make_fixtures.py`` writes the official model's outputs and
``tests/test_official.py`` matches this conversion against them.

- The ``.pt`` is a flat state dict, read with ``torch.load(weights_only=True)`` and nothing
  else; a training wrapper's ``lpips_loss.*`` tensors are ignored by name.
- The YAML's ``model.model_cfg.arch_cfg`` is the official ``AutoencoderKLConfig``; keys it
  leaves out take that class's defaults. It becomes a flavour (``atoken-so-c``, ``-so-d`` or
  ``-so-c-s1`` with ``flavor_overrides`` for other widths and depths) and a bottleneck.
- Tensor layout: the patch embedding ``[width, pt*p*p*3]`` is ``(pt, ph, pw, c)``-major,
  which is atoken's ``(width, pt, p*p*3)``; the pooling head's ``to_q`` and ``to_kv``
  (rows k then v) are ``nn.MultiheadAttention``'s ``in_proj`` (rows q, k, v); the probe
  ``[width]`` is ``(1, 1, width)``; every other tensor is renamed only.

Strict: every missing, unexpected or mis-shaped tensor is listed in one error, and nothing
is written unless all of them fit.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import zipfile
from typing import Any

import torch

from atoken_core.checkpoint import CheckpointError, listed, mismatch_lines
from atoken_core.io import read_input

IGNORED_PREFIXES = ("lpips_loss.",)
_LISTED = 10

# ``AutoencoderKLConfig``'s fields and defaults (official atoken_inference/model/autoencoder_kl.py).
ARCH_DEFAULTS: dict[str, Any] = {
    "patch_size": [1, 8, 8], "in_channels": 192, "out_channels": 192, "latent_channels": 8,
    "encoder_model_channels": 768, "encoder_num_blocks": 12, "encoder_num_heads": None,
    "encoder_mlp_channels": 2048, "encoder_attn_mode": "swin", "encoder_window_size": 8,
    "encoder_pe_mode": "rope", "encoder_qk_rms_norm": True, "encoder_use_bias": True,
    "encoder_use_rms_norm": False,
    "decoder_model_channels": 768, "decoder_num_blocks": 12, "decoder_num_heads": None,
    "decoder_mlp_channels": 2048, "decoder_attn_mode": "swin", "decoder_window_size": 8,
    "decoder_pe_mode": "rope", "decoder_qk_rms_norm": True, "decoder_use_bias": True,
    "decoder_use_rms_norm": False,
    "use_decoder": True, "use_quantizer": False, "quantizer_type": "fsq", "quantizer_codebook_size": 65536,
    "quantizer_num_codebooks": 1, "quantizer_feature_dim": 48, "quantizer_chunk_size": 1,
}
# FSQ levels per codebook size (the FSQ paper's recommendations, as the official code uses them).
FSQ_LEVELS = {2**8: [8, 6, 5], 2**10: [8, 5, 5, 5], 2**12: [4, 4, 4, 4, 4, 4], 2**14: [8, 8, 8, 6, 5],
              2**16: [8, 8, 8, 5, 5, 5]}
# The official model runs videos in chunks of this many frames (AutoencoderKL.num_sample_frames_batch_size).
CHUNK_FRAMES = 16
# LearnedPositionEmbedder's default 256 positions: a 16 x 16 grid.
POSITION_GRID = 16


class OfficialImportError(CheckpointError):
    """An official checkpoint or config that cannot be converted; the message names the file."""


# ----------------------------------------------------------------------------- reading


def read_arch_config(text: bytes, path: str) -> dict[str, Any]:
    """The YAML's (``text``, read from ``path``) ``model.model_cfg.arch_cfg`` with the official
    defaults filled in; unknown keys are an error listing them."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise OfficialImportError(f"{path}: not valid YAML: {err}") from None
    arch = (((data or {}).get("model") or {}).get("model_cfg") or {}).get("arch_cfg") if isinstance(data, dict) else None
    if not isinstance(arch, dict):
        raise OfficialImportError(f"{path}: no model.model_cfg.arch_cfg table (not an ml-atoken model config)")
    unknown = sorted(set(arch) - set(ARCH_DEFAULTS))
    if unknown:
        raise OfficialImportError(f"{path}: unknown architecture keys in model.model_cfg.arch_cfg: {', '.join(unknown)} "
                                  f"(known: {', '.join(ARCH_DEFAULTS)})")
    return {**ARCH_DEFAULTS, **arch}


def read_official_state(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file). Only ``torch.load(weights_only=True)`` touches the bytes."""
    data = read_input(path, OfficialImportError)
    digest = hashlib.sha256(data).hexdigest()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            first = str(err).strip().splitlines()
            why = next((line for line in first if "Unsupported" in line or "global" in line.lower()), first[0])
            raise OfficialImportError(f"{path}: refused by torch.load(weights_only=True): the pickle holds objects "
                                      f"other than tensors and plain containers ({why.strip()}); atoken never "
                                      "unpickles arbitrary objects") from None
        raise OfficialImportError(f"{path}: not a PyTorch checkpoint ({err})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, AttributeError, ImportError) as err:
        raise OfficialImportError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise OfficialImportError(f"{path}: holds a {type(state).__name__}, not a state dict (a dict of tensors)")
    bad = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v))
    if bad:
        raise OfficialImportError(f"{path}: not a flat state dict: {len(bad)} entries are not tensors "
                                  f"({listed(bad, _LISTED)})")
    return state, digest


# ----------------------------------------------------------------------------- architecture


def _problem(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def architecture(arch: dict[str, Any], source: str) -> tuple[str, dict[str, Any], int, dict[str, Any]]:
    """(base flavour name, flavour overrides, latent width, bottleneck table) of an arch_cfg.
    Raises one error listing everything atoken cannot represent."""
    from atoken_core.flavors import FLAVORS

    problems: list[str] = []
    patch = list(arch["patch_size"])
    ok_patch = len(patch) == 3 and patch[1] == patch[2]
    _problem(problems, ok_patch, f"patch_size {patch}: expected [t, p, p]")
    pt, p = (patch[0], patch[1]) if ok_patch else (1, 1)
    for key in ("in_channels", "out_channels"):
        _problem(problems, arch[key] == pt * p * p * 3,
                 f"{key} {arch[key]}: expected {pt}*{p}*{p}*3 = {pt * p * p * 3} (RGB patches of patch_size {patch})")
    for part in ("model_channels", "num_heads", "mlp_channels"):
        enc, dec = arch[f"encoder_{part}"], arch[f"decoder_{part}"]
        _problem(problems, enc == dec, f"encoder_{part} {enc} != decoder_{part} {dec}: atoken's encoder and decoder "
                                       "share one width, head count and MLP size")
    width = arch["encoder_model_channels"]
    heads = arch["encoder_num_heads"] or width // 64
    _problem(problems, width % heads == 0 and (width // heads) % 8 == 0,
             f"encoder_model_channels {width} / {heads} heads: the official 4D RoPE needs a head size divisible by 8")
    for side in ("encoder", "decoder"):
        _problem(problems, arch[f"{side}_attn_mode"] == "full",
                 f"{side}_attn_mode {arch[f'{side}_attn_mode']!r}: only 'full' attention (every released config)")
        _problem(problems, arch[f"{side}_pe_mode"] in ("joint", "rope"),
                 f"{side}_pe_mode {arch[f'{side}_pe_mode']!r}: only 'joint' (learned grid + RoPE) or 'rope'")
    for key, want in (("encoder_qk_rms_norm", False), ("encoder_use_bias", True), ("encoder_use_rms_norm", False),
                      ("decoder_use_bias", False), ("decoder_use_rms_norm", True), ("use_decoder", True),
                      ("quantizer_chunk_size", 1)):
        _problem(problems, arch[key] == want, f"{key} {arch[key]!r}: only {want!r} (as every released config)")
    latent = arch["latent_channels"]
    bottleneck: dict[str, Any] = {"kind": "kl", "bias": False}
    if arch["use_quantizer"]:
        levels = FSQ_LEVELS.get(arch["quantizer_codebook_size"])
        _problem(problems, arch["quantizer_type"] == "fsq", f"quantizer_type {arch['quantizer_type']!r}: only 'fsq'")
        _problem(problems, levels is not None, f"quantizer_codebook_size {arch['quantizer_codebook_size']}: "
                                               f"FSQ levels are known for {sorted(FSQ_LEVELS)}")
        _problem(problems, arch["quantizer_feature_dim"] == latent,
                 f"quantizer_feature_dim {arch['quantizer_feature_dim']} != latent_channels {latent}")
        if levels:
            _problem(problems, arch["quantizer_num_codebooks"] * len(levels) == latent,
                     f"quantizer_num_codebooks {arch['quantizer_num_codebooks']} x {len(levels)} levels != "
                     f"latent_channels {latent}")
        bottleneck = {"kind": "fsq", "bias": False, "levels": levels or [4] * 6, "logvar_rows": True}
    if problems:
        raise OfficialImportError("\n".join([f"{source}: an architecture atoken cannot load:",
                                             *(f"  {line}" for line in problems)]))
    base = "atoken-so-d" if arch["use_quantizer"] else ("atoken-so-c-s1" if latent == 32 else "atoken-so-c")
    fields = {
        "width": width, "depth": arch["encoder_num_blocks"], "decoder_depth": arch["decoder_num_blocks"],
        "heads": heads, "mlp": int(arch["encoder_mlp_channels"]), "patch_size": p, "temporal_patch": pt,
        "pos_embed_grid": POSITION_GRID if arch["encoder_pe_mode"] == "joint" else None,
        "decoder_pos_embed_grid": POSITION_GRID if arch["decoder_pe_mode"] == "joint" else None,
        "decoder_qk_norm": bool(arch["decoder_qk_rms_norm"]), "temporal_chunk": max(1, CHUNK_FRAMES // pt),
        "latent_dim": latent,
    }
    if bottleneck["kind"] == "fsq" and bottleneck["levels"] != [4] * 6:
        fields["bottleneck_settings"] = (("bias", False), ("levels", tuple(bottleneck["levels"])), ("logvar_rows", True))
    flavor = FLAVORS[base]
    overrides = {k: v for k, v in fields.items() if getattr(flavor, k) != v}
    return base, overrides, latent, bottleneck


def recipe_for(name: str, base: str, overrides: dict[str, Any], latent: int, bottleneck: dict[str, Any],
               video: bool) -> dict[str, Any]:
    """The recipe stored in the converted checkpoint: the architecture, Apple's input policy
    (centre crop, whole temporal patches) and a one-step stage on packaged data (a record, not
    a training plan: fine-tune with recipes/finetune-official.toml)."""
    modalities = ["image", "video"] if video else ["image"]
    return {
        "name": name,
        "model": {"flavor": base, "flavor_overrides": overrides, "latent_dim": latent},
        "bottleneck": bottleneck,
        "loss": [{"kind": "l1"}],
        "modality": {m: {"size_policy": "crop"} for m in modalities},
        "data": {"image": {"kind": "packaged_photos"}, **({"video": {"kind": "packaged_clips"}} if video else {})},
        "stage": [{"name": "imported", "steps": 1, "modalities": modalities}],
    }


# ----------------------------------------------------------------------------- tensors

Rename = tuple[re.Pattern[str], str]
RENAMES: list[Rename] = [(re.compile(a), b) for a, b in (
    (r"encoder\.input_layer\.(weight|bias)", r"patch_embed.\1"),
    (r"encoder\.pos_embedder\.position_embedding\.weight", "pos_embed"),
    (r"decoder\.pos_embedder\.position_embedding\.weight", "decoder_pos_embed"),
    (r"(en|de)coder\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"\1coder.\2.\3.\4"),
    (r"(en|de)coder\.blocks\.(\d+)\.attn\.to_qkv\.(weight|bias)", r"\1coder.\2.attn.qkv.\3"),
    (r"(en|de)coder\.blocks\.(\d+)\.attn\.to_out\.(weight|bias)", r"\1coder.\2.attn.proj.\3"),
    (r"(en|de)coder\.blocks\.(\d+)\.attn\.(q|k)_rms_norm\.gamma", r"\1coder.\2.attn.\3_norm.gamma"),
    (r"(en|de)coder\.blocks\.(\d+)\.mlp\.mlp\.(0|2)\.(weight|bias)", r"\1coder.\2.mlp.\3.\4"),
    (r"encoder\.post_layernorm\.(weight|bias)", r"encoder_norm.\1"),
    (r"encoder\.head\.probe", "pool_head.probe"),
    (r"encoder\.head\.attention\.to_out\.(weight|bias)", r"pool_head.attention.out_proj.\1"),
    (r"encoder\.head\.layernorm\.(weight|bias)", r"pool_head.layernorm.\1"),
    (r"encoder\.head\.mlp\.mlp\.(0|2)\.(weight|bias)", r"pool_head.mlp.\1.\2"),
    (r"proj\.(weight|bias)", r"bottleneck.proj.\1"),
    (r"decoder\.input_layer\.(weight|bias)", r"decoder_in.\1"),
    (r"decoder\.out_norm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder\.out_layer\.(weight|bias)", r"pixel_head.\1"),
)]
# Tensors whose layout differs only by a reshape (same elements, same order).
RESHAPED = {"patch_embed.weight", "pool_head.probe"}
# The pooling head's separate query and key/value projections -> MultiheadAttention's in_proj.
FUSED: dict[str, tuple[str, str]] = {
    "pool_head.attention.in_proj_weight": ("encoder.head.attention.to_q.weight", "encoder.head.attention.to_kv.weight"),
    "pool_head.attention.in_proj_bias": ("encoder.head.attention.to_q.bias", "encoder.head.attention.to_kv.bias"),
}


def _ours(key: str) -> str | None:
    for pattern, replacement in RENAMES:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def convert_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                  source: str) -> tuple[dict[str, torch.Tensor], int]:
    """Official tensors -> atoken's ``model.state_dict()`` keys and shapes (``expected``), and
    the number of ignored training-only tensors. Raises one error listing every problem."""
    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    fused_parts = {part for parts in FUSED.values() for part in parts}
    for key, value in state.items():
        if key in fused_parts:
            continue
        ours = _ours(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        out[ours], origin[ours] = value, key
    for ours, parts in FUSED.items():
        present = [k for k in parts if k in state]
        if ours in expected and len(present) == len(parts):
            out[ours], origin[ours] = torch.cat([state[k] for k in parts]), " + ".join(parts)
        else:
            unexpected += present  # one half alone, or a head this architecture does not have
    shapes = []
    for ours, value in out.items():
        want = expected[ours]
        if value.shape != want:
            if ours in RESHAPED and value.numel() == want.numel():
                out[ours] = value.reshape(want)
            else:
                shapes.append(f"{origin[ours]}: file {tuple(value.shape)}, expected {tuple(want)} (atoken {ours})")
    missing = sorted(set(expected) - set(out))  # atoken's names
    if missing or unexpected or shapes:
        lines = mismatch_lines(missing, sorted(unexpected), shapes, _LISTED)
        raise OfficialImportError("\n  ".join([f"{source}: the weights do not match the architecture of the config",
                                                *lines]))
    return {k: v.contiguous() for k, v in out.items()}, len(ignored)


# ----------------------------------------------------------------------------- the command


def import_official(checkpoint: str, config: str, output: str, *, name: str | None = None,
                    registries: Any = None) -> dict[str, Any]:
    """Convert and write; returns what was converted. Nothing is written on any error."""
    from atoken_core.build import build_model
    from atoken_core.checkpoint import save_checkpoint
    from atoken_core.plugin_manager import get_registries
    from atoken_core.recipe import recipe_from_dict, recipe_to_dict
    from atoken_official import WEIGHTS_TERMS

    if os.path.abspath(output) in (os.path.abspath(checkpoint), os.path.abspath(config)):
        raise OfficialImportError(f"{output}: the output would overwrite an input")
    registries = registries or get_registries()
    config_bytes = read_input(config, OfficialImportError)
    arch = read_arch_config(config_bytes, config)
    base, overrides, latent, bottleneck = architecture(arch, config)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(checkpoint).rsplit(".", 1)[0]) or "official"
    video = not base.endswith("-s1")
    recipe = recipe_from_dict(recipe_for(name or stem, base, overrides, latent, bottleneck, video), registries,
                              f"{config} (converted recipe)")
    with torch.device("meta"):
        model = build_model(recipe, registries)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, digest = read_official_state(checkpoint)
    tensors, ignored = convert_state(state, expected, checkpoint)
    provenance = {
        "origin": "apple/ml-atoken", "file": os.path.basename(checkpoint), "sha256": digest,
        "config": os.path.basename(config), "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "weights_terms": WEIGHTS_TERMS,
    }
    save_checkpoint(output, model, recipe=recipe_to_dict(recipe), step=0, stage=0, model_state=tensors,
                    extra_metadata={"imported_from": provenance})
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()), "flavor": base,
            "overrides": overrides, "bottleneck": bottleneck["kind"], "ignored": ignored, "sha256": digest}
