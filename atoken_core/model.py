"""The AToken transformer: patch embedding over t x p x p blocks, pre-norm blocks with 4D
rotary position embedding, and attention restricted to each packed sample."""

from __future__ import annotations

import itertools
import math
from typing import Any

import attrs
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from atoken_core.flavors import FLAVORS, Flavor
from atoken_core.interfaces import Bottleneck, BottleneckOutput, PatchSpec
from atoken_core.sparse import AXES, Sparse4D

__all__ = ["FLAVORS", "AToken", "Flavor", "RoPE4D"]


class RoPE4D(nn.Module):
    """Rotary embedding over (t, x, y, z): the head dimension is split into four equal groups
    of rotation pairs (adjacent channels), one group per axis in the order ``axes``, so a
    query-key score depends only on the coordinate difference along every axis. Pair ``j`` of
    a group turns at ``theta^(-j / n)`` per unit of its coordinate (``n = head_dim // 8`` pairs
    per axis). Dimensions left over (head_dim not divisible by 8) are not rotated."""

    def __init__(self, head_dim: int, theta: float = 100.0, axes: tuple[str, ...] = AXES) -> None:
        super().__init__()
        self.pairs_per_axis = head_dim // 8
        if self.pairs_per_axis == 0:
            raise ValueError(f"head_dim {head_dim} is too small for 4D RoPE (needs >= 8)")
        if sorted(axes) != sorted(AXES):
            raise ValueError(f"RoPE axes must order {AXES}, got {axes!r}")
        n = self.pairs_per_axis
        freqs = theta ** (-torch.arange(n, dtype=torch.float64) / n)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.register_buffer("axis_index", torch.tensor([AXES.index(a) for a in axes]), persistent=False)

    def angles(self, coords: torch.Tensor) -> torch.Tensor:
        """(L, 4) integer coords [t, x, y, z] -> (L, 4 * pairs) rotation angles, axis groups in
        the order ``axes``."""
        ang = coords[:, self.axis_index].to(self.freqs.dtype)[:, :, None] * self.freqs  # (L, 4, n)
        return ang.flatten(1)

    def rotate(self, x_lhd: torch.Tensor, cos_lp: torch.Tensor, sin_lp: torch.Tensor) -> torch.Tensor:
        rot = 8 * self.pairs_per_axis
        x_rot, x_pass = x_lhd[..., :rot], x_lhd[..., rot:]
        pairs = x_rot.float().unflatten(-1, (-1, 2))  # (L, H, 4n, 2)
        cos, sin = cos_lp[:, None, :], sin_lp[:, None, :]
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((rotated.to(x_lhd.dtype), x_pass), dim=-1)

    def forward(self, x_lhd: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        return self.rotate(x_lhd, angles.cos(), angles.sin())


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, normalised in float32 (as Apple's decoder does it)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (y * self.weight.float()).to(x.dtype)


class HeadRMSNorm(nn.Module):
    """QK-norm: each head's query (or key) scaled to norm sqrt(head_dim), times a learned gain
    per head and channel (``gamma``, (heads, head_dim))."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x_lhd: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x_lhd.float(), dim=-1) * self.gamma.float() * math.sqrt(x_lhd.shape[-1])
        return y.to(x_lhd.dtype)


def make_norm(kind: str, width: int) -> nn.Module:
    """A block's norm: LayerNorm (with bias) or RMSNorm, eps 1e-6 (Flavor.decoder_norm)."""
    return RMSNorm(width, eps=1e-6) if kind == "rmsnorm" else nn.LayerNorm(width, eps=1e-6)


@attrs.frozen
class AttentionGroups:
    """Which token rows of a packed batch attend together, worked out once per forward pass
    (one host read of the lengths) and shared by every layer: the layers then run no
    data-dependent Python, so a GPU does not sync in each of them and ``torch.compile`` traces
    whole blocks without graph breaks."""

    length: int | None  # every sample has this many tokens: one batched call, no gathers
    # otherwise, per distinct length: (length, (b, length) token rows of the samples that long)
    rows: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def of(cls, tokens: Sparse4D) -> AttentionGroups:
        n = tokens.uniform_length()
        if n is not None:
            return cls(n)
        return cls(None, tuple((length, rows) for length, _, rows in tokens.length_groups()))


def packed_attention(q_lhd: torch.Tensor, k_lhd: torch.Tensor, v_lhd: torch.Tensor,
                     groups: AttentionGroups) -> torch.Tensor:
    """Attention within each packed sample only (block-diagonal), without padding.

    Samples are grouped by length and each group runs as one batched SDPA call, so the cost
    is the sum over samples of n_i^2 — never (total length)^2, never batch x longest^2.
    """
    if groups.length is not None:
        # Equal lengths (fixed-size training crops): one group, no gather needed.
        q, k, v = (rearrange(t, "(b n) h d -> b h n d", n=groups.length) for t in (q_lhd, k_lhd, v_lhd))
        out = F.scaled_dot_product_attention(q, k, v)
        return rearrange(out, "b h n d -> (b n) h d")
    out = torch.empty_like(q_lhd)
    for _, index_bn in groups.rows:
        q, k, v = (rearrange(t[index_bn], "b n h d -> b h n d") for t in (q_lhd, k_lhd, v_lhd))
        out[index_bn] = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n h d")
    return out


KV = tuple[torch.Tensor, torch.Tensor]  # cached (keys, values) of one layer, each (L, heads, head_dim)


class Attention(nn.Module):
    """Self-attention with 4D RoPE on queries and keys (after QK-norm when it has one).

    With ``rope_scale=True`` a learnable scalar ``s`` scales every rotation angle
    (``s * coord * freq``). For every value of ``s`` this is still a rotation by an angle
    linear in the coordinate, so scores depend on coordinate differences only. It starts at 1
    (plain RoPE) for a model trained from scratch; importing SigLIP2 sets it to 0, where no
    channel turns and the encoder reproduces SigLIP2 exactly; training then moves it.
    """

    def __init__(self, width: int, heads: int, rope: RoPE4D, *, bias: bool = True, qk_norm: bool = False,
                 rope_scale: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.q_norm = HeadRMSNorm(heads, width // heads) if qk_norm else None
        self.k_norm = HeadRMSNorm(heads, width // heads) if qk_norm else None
        self.rope = rope
        # one element, not a 0-d scalar: FSDP2's fully_shard cannot shard 0-d parameters
        self.rope_scale = nn.Parameter(torch.ones(1)) if rope_scale else None

    def qkv_rotated(self, x_ld: torch.Tensor, angles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = rearrange(self.qkv(x_ld), "l (three h d) -> three l h d", three=3, h=self.heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_scale is not None:
            angles = angles * self.rope_scale.float()
        cos, sin = angles.cos(), angles.sin()
        return self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin), v

    def forward(self, x_ld: torch.Tensor, groups: AttentionGroups, angles: torch.Tensor) -> torch.Tensor:
        out = packed_attention(*self.qkv_rotated(x_ld, angles), groups)
        return self.proj(rearrange(out, "l h d -> l (h d)"))

    def forward_cached(self, x_ld: torch.Tensor, angles: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """One temporal tile of one sample: its tokens attend to themselves and to the cached
        (already rotated) keys and values of the previous tile. Returns this tile's to cache."""
        q, k, v = self.qkv_rotated(x_ld, angles)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k]), torch.cat([past[1], v]))
        out = F.scaled_dot_product_attention(*(rearrange(t, "l h d -> 1 h l d") for t in (q, keys, values)))
        return self.proj(rearrange(out, "1 h l d -> l (h d)")), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block. ``norm``: "layernorm" or "rmsnorm"; ``bias``: of the
    attention and MLP linears; ``qk_norm`` and ``rope_scale``: see :class:`Attention`."""

    def __init__(self, width: int, heads: int, mlp: int, rope: RoPE4D, *, norm: str = "layernorm",
                 bias: bool = True, qk_norm: bool = False, rope_scale: bool = False) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, width)
        self.attn = Attention(width, heads, rope, bias=bias, qk_norm=qk_norm, rope_scale=rope_scale)
        self.norm2 = make_norm(norm, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp, bias=bias), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp, width, bias=bias))

    def forward(self, x_ld: torch.Tensor, groups: AttentionGroups, angles: torch.Tensor) -> torch.Tensor:
        x_ld = x_ld + self.attn(self.norm1(x_ld), groups, angles)
        return x_ld + self.mlp(self.norm2(x_ld))

    def forward_cached(self, x_ld: torch.Tensor, angles: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        h_ld, kv = self.attn.forward_cached(self.norm1(x_ld), angles, past)
        x_ld = x_ld + h_ld
        return x_ld + self.mlp(self.norm2(x_ld)), kv


class PatchEmbed(nn.Module):
    """Linear map of a ``t x p x p x C`` block (channel-last inside each frame, SigLIP2's
    layout). A token with fewer frames than ``t`` (an image) uses only the first frames'
    weights; the weights of frames 1.. start at zero, so a still image embeds exactly as
    with a ``p x p`` patch embedding and a video of identical frames gives the same features."""

    def __init__(self, spec: PatchSpec, width: int) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(width, spec.temporal_patch, spec.frame_dim))
        self.bias = nn.Parameter(torch.zeros(width))
        nn.init.trunc_normal_(self.weight[:, 0], std=1.0 / math.sqrt(spec.frame_dim))
        with torch.no_grad():
            self.weight[:, 1:].zero_()

    def forward(self, patches_lf: torch.Tensor) -> torch.Tensor:
        frames, rest = divmod(patches_lf.shape[1], self.spec.frame_dim)
        if rest or not 1 <= frames <= self.spec.temporal_patch:
            s = self.spec
            raise ValueError(f"patch features of width {patches_lf.shape[1]} are not 1..{s.temporal_patch} frames of "
                             f"{s.patch_size}x{s.patch_size} pixels with {s.channels} channels ({s.frame_dim} values "
                             "each), which this patch embedding takes")
        w = self.weight[:, :frames].flatten(1)
        return F.linear(patches_lf, w, self.bias)


def resize_pos_embed(grid_ggd: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (g, g, D) learned grid -> (rows, cols, D), exactly as transformers'
    ``Siglip2VisionEmbeddings.resize_positional_embeddings`` does it (bilinear, antialias,
    align_corners=False), so imported SigLIP2 weights see the positions they were trained on.
    Interpolation runs in float32: CPU antialias has no bf16/fp16 kernel, and SigLIP2 upcasts too."""
    grid = rearrange(grid_ggd.float(), "h w d -> 1 d h w")
    resized = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
    return rearrange(resized, "1 d h w -> h w d").to(grid_ggd.dtype)


class AttentionPool(nn.Module):
    """SigLIP2's multi-head attention pooling head (``Siglip2MultiheadAttentionPoolingHead``):
    a learned probe attends over a sample's tokens, then a pre-norm residual MLP. Over a packed
    batch, sample ``b``'s probe may only attend to sample ``b``'s tokens, which is what SigLIP2's
    padding mask does for a padded batch. Parameter names mirror SigLIP2's ``head.*``."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, width))

    def forward(self, x_ld: torch.Tensor, tokens: Sparse4D) -> torch.Tensor:
        """(L, D) features of a packed batch -> (B, D), one vector per sample. Samples of one
        length attend in one batched call (memory O(L), not O(B * L) as one masked call over the
        whole batch would take); a sample without tokens pools to what attention over nothing
        gives, zero weights on every value (the output projection's bias), not NaN."""
        b, d = tokens.batch_size, x_ld.shape[1]
        attn = self.attention
        pooled = (attn.out_proj.bias if attn.out_proj.bias is not None else x_ld.new_zeros(d)).expand(b, d)
        pooled = pooled.to(x_ld.dtype).clone()
        for _, which, rows_bn in tokens.length_groups():
            keys_bnd = x_ld[rows_bn]
            probes = self.probe.expand(len(which), 1, d).to(keys_bnd.dtype)
            out = attn(probes, keys_bnd, keys_bnd, need_weights=False)[0][:, 0]
            pooled = pooled.index_copy(0, torch.tensor(which, device=x_ld.device), out.to(pooled.dtype))
        return pooled + self.mlp(self.layernorm(pooled))


@attrs.frozen
class ForwardOutput:
    recon: torch.Tensor  # (L, frames*p*p*C) patch pixels, or a modality head's outputs
    bottleneck: BottleneckOutput
    semantic: torch.Tensor | None = None  # (B, text_dim) W_s(pool(features))


class AToken(nn.Module):
    """Encoder -> bottleneck (owns W_r) -> decoder, over packed sparse 4D tokens.

    With ``shortcut=True`` a linear path runs beside the transformer: patch pixels -> latent
    (added to W_r's output before the bottleneck regularises or quantises it) and latent ->
    patch pixels (added to the pixel head's output). :meth:`init_shortcut` starts it at the
    PCA solution with the transformer's contributions at zero, so training begins at the
    best linear tokenizer and the transformer learns what is left (DC-AE, arXiv 2410.10733,
    reports that shortcuts around high-compression autoencoders ease their optimisation).
    """

    def __init__(self, flavor: Flavor, bottleneck: Bottleneck, channels: int = 3, *, shortcut: bool = False) -> None:
        super().__init__()
        self.flavor = flavor
        self.spec = PatchSpec(flavor.patch_size, flavor.temporal_patch, channels)
        self.activation_checkpointing = False  # set by the trainer (recipe parallel.activation_checkpointing)
        w = flavor.width
        self.rope = RoPE4D(flavor.head_dim, flavor.rope_theta, flavor.rope_axes)
        self.patch_embed = PatchEmbed(self.spec, w)
        # SigLIP2-style learned positions (row-major g*g rows, SigLIP2's layout); flavours
        # without them rely on RoPE alone and keep exactly their previous parameters.
        g = flavor.pos_embed_grid
        self.pos_embed = nn.Parameter(torch.randn(g * g, w) * 0.02) if g else None
        self.encoder = nn.ModuleList(
            Block(w, flavor.heads, flavor.mlp, self.rope, rope_scale=flavor.rope_scale) for _ in range(flavor.depth)
        )
        self.encoder_norm = nn.LayerNorm(w, eps=1e-6)
        self.pool_head = AttentionPool(w, flavor.heads, flavor.mlp) if flavor.semantic else None
        # W_s: the pooled vector into the text embedding space (identity after SigLIP2 import,
        # whose pooled output already lives in its image-text space). Apple's release has none.
        has_ws = flavor.semantic and flavor.text_projection
        self.semantic_proj = nn.Linear(w, flavor.text_dim or w) if has_ws else None
        self.bottleneck = bottleneck
        bias = flavor.decoder_bias
        self.decoder_in = nn.Linear(bottleneck.latent_dim, w, bias=bias)
        gd = flavor.decoder_pos_embed_grid
        self.decoder_pos_embed = nn.Parameter(torch.randn(gd * gd, w) * 0.02) if gd else None
        self.decoder = nn.ModuleList(
            Block(w, flavor.heads, flavor.mlp, self.rope, norm=flavor.decoder_norm, bias=bias,
                  qk_norm=flavor.decoder_qk_norm) for _ in range(flavor.decoder_depth)
        )
        self.decoder_norm = make_norm(flavor.decoder_norm, w)
        self.pixel_head = nn.Linear(w, flavor.temporal_patch * self.spec.frame_dim, bias=bias)
        # Output heads of modalities that do not decode to patch pixels (3D: Gaussian
        # parameters), by modality name; see :meth:`add_head`.
        self.heads = nn.ModuleDict()
        # Input embeddings of modalities whose pixels have another channel count than
        # ``spec.channels``, by modality name; see :meth:`add_stem`.
        self.stems = nn.ModuleDict()
        self.shortcut_in = PatchEmbed(self.spec, bottleneck.latent_dim) if shortcut else None
        self.shortcut_out = nn.Linear(bottleneck.latent_dim, flavor.temporal_patch * self.spec.frame_dim) if shortcut else None
        for name, child in self.named_children():
            if name != "bottleneck":  # the bottleneck initialises its own W_r (e.g. the logvar bias)
                child.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @staticmethod
    def grid_embeddings(table_nd: torch.Tensor, tokens: Sparse4D) -> torch.Tensor:
        """(L, width): a learned square grid (g*g rows, row-major) resized to each sample's
        (rows, cols) patch grid and read at every token's [row, col] = [y, x]. The grid size of a
        sample is its largest coordinate + 1 (images: rows = max y + 1, cols = max x + 1); t and
        z are ignored, so every frame of a video shares its image's positions."""
        g = math.isqrt(table_nd.shape[0])
        grid_ggd = rearrange(table_nd, "(h w) d -> h w d", h=g, w=g)
        x_l, y_l = tokens.coords[:, 1], tokens.coords[:, 2]
        out = table_nd.new_empty(tokens.num_tokens, table_nd.shape[1])
        bounds = tokens.offsets
        # every sample's grid size in one device reduction and one host read
        ids = tokens.sample_ids()
        extent_b2 = torch.zeros(tokens.batch_size, 2, dtype=torch.long, device=ids.device)
        extent_b2.scatter_reduce_(0, ids[:, None].expand(-1, 2), torch.stack([y_l, x_l], 1), "amax")
        extents = (extent_b2 + 1).tolist()
        resized: dict[tuple[int, int], torch.Tensor] = {}  # samples of one shape share a resize
        for (a, b), (rows, cols) in zip(itertools.pairwise(bounds), extents):
            if a == b:
                continue
            if (rows, cols) not in resized:
                resized[rows, cols] = resize_pos_embed(grid_ggd, rows, cols)
            out[a:b] = resized[rows, cols][y_l[a:b], x_l[a:b]]
        return out

    def position_embeddings(self, tokens: Sparse4D) -> torch.Tensor:
        """The encoder's learned positions for every token (see :meth:`grid_embeddings`)."""
        return self.grid_embeddings(self.pos_embed, tokens)

    def attention_view(self, tokens: Sparse4D) -> Sparse4D:
        """The packing the transformer sees: each sample itself, or, for flavours that run videos
        in independent chunks (``temporal_chunk``), each chunk of a sample as a sample of its
        own with t restarting at 0 (Apple's 16-frame chunks). Same tokens, same order."""
        chunk = self.flavor.temporal_chunk
        return tokens if chunk is None else tokens.chunk_time(chunk)

    def embed(self, patches: Sparse4D, stem: str | None = None) -> torch.Tensor:
        """Patch embedding (the modality ``stem``'s own, where it has one) plus learned positions,
        of tokens as :meth:`attention_view` packs them."""
        x_ld = self.patch_embed_of(stem)(patches.features)
        if self.pos_embed is not None:
            x_ld = x_ld + self.position_embeddings(patches)
        return x_ld

    def decoder_input(self, latent: Sparse4D) -> torch.Tensor:
        x_ld = self.decoder_in(latent.features)
        if self.decoder_pos_embed is not None:
            x_ld = x_ld + self.grid_embeddings(self.decoder_pos_embed, latent)
        return x_ld

    def patch_embed_of(self, stem: str | None) -> PatchEmbed:
        return self.stems[stem] if stem is not None and stem in self.stems else self.patch_embed

    def encode(self, patches: Sparse4D, stem: str | None = None) -> torch.Tensor:
        """Patch pixels (L, frames*p*p*C) -> encoder features (L, width). ``stem``: the modality
        whose own input embedding to use (ignored when it has none)."""
        view = self.attention_view(patches)
        angles = self.rope.angles(view.coords)
        x_ld = self.embed(view, stem)
        groups = AttentionGroups.of(view)
        for block in self.encoder:
            x_ld = self._run_block(block, x_ld, groups, angles)
        return self.encoder_norm(x_ld)

    def compile_blocks(self) -> None:
        """torch.compile every transformer block, with dynamic shapes: packed batches change
        their token count from step to step, and one graph per length would recompile forever.
        Packing, the bottleneck and the heads stay eager (cheap, and data-dependent)."""
        for block in [*self.encoder, *self.decoder]:
            block.compile(dynamic=True)

    def _run_block(self, block: Block, x_ld: torch.Tensor, groups: AttentionGroups, angles: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            # keep only the block's input; recompute its insides in the backward pass
            return torch.utils.checkpoint.checkpoint(block, x_ld, groups, angles, use_reentrant=False)
        return block(x_ld, groups, angles)

    def _run_tiled(self, blocks: nn.ModuleList, first: Any, norm: nn.Module, tokens: Sparse4D,
                   tile_blocks: int, finish: Any = None) -> torch.Tensor:
        """Run ``blocks`` over one sample in temporal tiles of ``tile_blocks`` temporal blocks;
        each tile attends to itself and the previous tile through a per-layer KV cache, so
        memory and per-tile work stay flat however long the video is. ``finish(x_ld, part)``
        maps each tile's output before it is kept (to the latent, or to pixels), so what
        accumulates is the result, not every tile's hidden states."""
        if tokens.batch_size != 1:
            raise ValueError("temporal tiling runs on one sample at a time")
        if self.flavor.temporal_chunk is not None:
            raise ValueError(f"this flavour runs videos in independent chunks of {self.flavor.temporal_chunk} latent "
                             "frames (temporal_chunk): encode/decode already work chunk by chunk; KV-cached tiles "
                             "would compute something else")
        if tile_blocks < 1:
            raise ValueError(f"tile_blocks must be >= 1, got {tile_blocks}")
        tile_l = tokens.coords[:, 0] // tile_blocks
        if bool((tile_l[1:] < tile_l[:-1]).any()):
            raise ValueError("temporal tiling needs tokens ordered by time (as the video modality emits them)")
        bounds = torch.searchsorted(tile_l, torch.arange(int(tile_l.max()) + 2, device=tile_l.device)).tolist()
        cache: list[KV | None] = [None] * len(blocks)
        out = None  # filled tile by tile: no list of tiles plus a concatenated copy
        for a, b in itertools.pairwise(bounds):
            part = Sparse4D.single(tokens.features[a:b], tokens.coords[a:b])
            angles = self.rope.angles(part.coords)
            x_ld = first(part)
            for i, block in enumerate(blocks):
                x_ld, cache[i] = block.forward_cached(x_ld, angles, cache[i])
            y = norm(x_ld)
            y = y if finish is None else finish(y, part)
            if out is None:
                out = y.new_empty(tokens.num_tokens, y.shape[1])
            out[a:b] = y
        return out

    def encode_tiled(self, patches: Sparse4D, tile_blocks: int) -> torch.Tensor:
        """:meth:`encode` of one long video in temporal tiles (see :meth:`_run_tiled`). Equal to
        :meth:`encode` when the video fits in one tile."""
        return self._run_tiled(self.encoder, self.embed, self.encoder_norm, patches, tile_blocks)

    def encode_latent_tiled(self, patches: Sparse4D, tile_blocks: int) -> torch.Tensor:
        """:meth:`encode_latent` of one long video in temporal tiles, each tile projected to the
        latent as soon as it is encoded (only latent_dim channels per token are kept)."""
        return self._run_tiled(self.encoder, self.embed, self.encoder_norm, patches, tile_blocks,
                               lambda x_ld, part: self.bottleneck.encode_project(x_ld, self.latent_offset(part)))

    def decode_tiled(self, latent: Sparse4D, tile_blocks: int, frames: int = 1) -> torch.Tensor:
        """:meth:`decode` of one long video in temporal tiles, each tile turned into pixels as
        soon as it is decoded."""
        return self._run_tiled(self.decoder, self.decoder_input, self.decoder_norm,
                               latent, tile_blocks, lambda x_ld, part: self._to_pixels(x_ld, part.features, frames))

    def pool(self, features: torch.Tensor, tokens: Sparse4D) -> torch.Tensor:
        """Encoder features (L, width) of a packed batch -> (B, width) semantic vectors."""
        if self.pool_head is None:
            raise ValueError("this model's flavour has no semantic head (flavor.semantic is False)")
        return self.pool_head(features, tokens)

    def semantic_embedding(self, features: torch.Tensor, tokens: Sparse4D) -> torch.Tensor:
        """(B, text_dim): W_s applied to the pooled vector (the pooled vector itself for flavours
        without W_s), for image-text similarity; not normalised."""
        pooled = self.pool(features, tokens)
        return pooled if self.semantic_proj is None else self.semantic_proj(pooled)

    def no_weight_decay(self) -> set[str]:
        """Matrices that weight decay would only pull towards zero without regularising anything:
        learned position grids and the pooling probe (a query, not a map)."""
        names = {"pos_embed", "decoder_pos_embed", "pool_head.probe"}
        return {n for n, _ in self.named_parameters() if n in names}

    def add_stem(self, name: str, channels: int) -> None:
        """Give modality ``name`` its own patch embedding for ``channels``-channel pixels (the
        transformer, bottleneck and positions stay shared)."""
        if name in self.stems:
            if self.stems[name].spec.channels != channels:
                raise ValueError(f"stem {name!r} exists for {self.stems[name].spec.channels} channels, not {channels}")
            return
        spec = PatchSpec(self.spec.patch_size, self.spec.temporal_patch, channels)
        self.stems[name] = PatchEmbed(spec, self.flavor.width).to(self.patch_embed.weight.device,
                                                                  self.patch_embed.weight.dtype)

    def add_head(self, name: str, out_dim: int) -> None:
        """Give modality ``name`` its own linear output head on the shared decoder."""
        if name in self.heads:
            if self.heads[name].out_features != out_dim:
                raise ValueError(f"head {name!r} exists with {self.heads[name].out_features} outputs, not {out_dim}")
            return
        head = nn.Linear(self.flavor.width, out_dim).to(self.pixel_head.weight.device, self.pixel_head.weight.dtype)
        self._init_linear(head)
        self.heads[name] = head

    def decode(self, latent: Sparse4D, frames: int = 1, head: str | None = None) -> torch.Tensor:
        """Latent (L, latent_dim) -> patch pixels (L, frames*p*p*C), or the outputs of the
        modality head ``head`` (L, out_dim)."""
        view = self.attention_view(latent)
        angles = self.rope.angles(view.coords)
        x_ld = self.decoder_input(view)
        groups = AttentionGroups.of(view)
        for block in self.decoder:
            x_ld = self._run_block(block, x_ld, groups, angles)
        x_ld = self.decoder_norm(x_ld)
        if head is not None:
            return self.heads[head](x_ld)
        return self._to_pixels(x_ld, latent.features, frames)

    def _to_pixels(self, x_ld: torch.Tensor, latent_ld: torch.Tensor, frames: int) -> torch.Tensor:
        out = self.pixel_head(x_ld)
        if self.shortcut_out is not None:
            out = out + self.shortcut_out(latent_ld)
        return out[:, : frames * self.spec.frame_dim]

    def latent_offset(self, patches: Sparse4D, stem: str | None = None) -> torch.Tensor | None:
        """The linear shortcut's share of the latent (RGB patches only: a modality with its own
        stem has none)."""
        if self.shortcut_in is None or (stem is not None and stem in self.stems):
            return None
        return self.shortcut_in(patches.features)

    def encode_latent(self, patches: Sparse4D, stem: str | None = None) -> torch.Tensor:
        """Patch pixels -> the deterministic latent (posterior mean or quantised values)."""
        return self.bottleneck.encode_project(self.encode(patches, stem), self.latent_offset(patches, stem))

    def forward(self, patches: Sparse4D, *, sample: bool = True, head: str | None = None
                ) -> tuple[torch.Tensor, BottleneckOutput]:
        out = self.forward_all(patches, sample=sample, head=head, semantic=False)
        return out.recon, out.bottleneck

    def forward_all(self, patches: Sparse4D, *, sample: bool = True, head: str | None = None,
                    semantic: bool = False) -> ForwardOutput:
        """One encoding, both projections: the reconstruction (through W_r, the bottleneck and the
        decoder) and, when ``semantic``, the W_s embedding per sample (B, text_dim). ``head`` names
        the modality's own output head and, where it has one, its input stem."""
        frames = patches.features.shape[1] // self.patch_embed_of(head).spec.frame_dim
        features = self.encode(patches, head)
        bott = self.bottleneck(features, sample=sample, offset=self.latent_offset(patches, head))
        recon = self.decode(patches.with_features(bott.latent), frames, head)
        sem = self.semantic_embedding(features, patches) if semantic else None
        return ForwardOutput(recon, bott, sem)

    @torch.no_grad()
    def replace_bottleneck(self, new: Bottleneck) -> None:
        """Install a new bottleneck. A same-kind bottleneck with at least as many channels keeps
        the old one's channels, and the channels it adds enter the decoder (and the shortcut)
        through zero weights, so reconstructions are unchanged at the switch."""
        old, k, n = self.bottleneck, self.bottleneck.latent_dim, new.latent_dim
        grow = type(new) is type(old) and n >= k
        if grow:
            new.grow_from(old)
        elif n == k:
            new.convert_from(old)  # e.g. KL -> FSQ starts from the KL mean's projection
        self.bottleneck = new
        if n == k:
            return

        def widened(layer: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
            out = nn.Linear(in_features, out_features, bias=layer.bias is not None).to(layer.weight.device,
                                                                                       layer.weight.dtype)
            nn.init.zeros_(out.weight)
            out.weight[: layer.out_features, : layer.in_features].copy_(layer.weight)
            if layer.bias is not None:
                out.bias.zero_()
                out.bias[: layer.out_features].copy_(layer.bias)
            return out

        if not grow:
            self.decoder_in = nn.Linear(n, self.flavor.width, bias=self.flavor.decoder_bias).to(
                self.decoder_in.weight.device)
            self._init_linear(self.decoder_in)
        else:
            self.decoder_in = widened(self.decoder_in, n, self.flavor.width)
        if self.shortcut_in is not None:
            old_in = self.shortcut_in
            self.shortcut_in = PatchEmbed(self.spec, n).to(old_in.weight.device)
            self.shortcut_in.weight.zero_()
            self.shortcut_in.bias.zero_()
            if grow:
                self.shortcut_in.weight[:k].copy_(old_in.weight)
                self.shortcut_in.bias[:k].copy_(old_in.bias)
            self.shortcut_out = widened(self.shortcut_out, n, self.shortcut_out.out_features)

    @torch.no_grad()
    def init_shortcut(self, mean_d: torch.Tensor, basis_kd: torch.Tensor, variance_k: torch.Tensor) -> None:
        """Start at PCA: latent = whitened top-k coefficients of the first frame's patch,
        pixels = the PCA reconstruction (repeated over a token's frames)."""
        if self.shortcut_in is None:
            raise ValueError("this model was built without a shortcut (model.shortcut = 'none')")
        k, d = basis_kd.shape
        if (k, d) != (self.bottleneck.latent_dim, self.spec.frame_dim):
            raise ValueError(f"PCA basis {(k, d)} does not fit latent_dim x patch dim "
                             f"{(self.bottleneck.latent_dim, self.spec.frame_dim)}")
        scale_k = variance_k.clamp_min(1e-12).sqrt()
        w_in = basis_kd / scale_k[:, None]
        self.shortcut_in.weight.zero_()
        self.shortcut_in.weight[:, 0].copy_(w_in)
        self.shortcut_in.bias.copy_(-(w_in @ mean_d))
        frames = self.spec.temporal_patch
        self.shortcut_out.weight.copy_((basis_kd * scale_k[:, None]).T.repeat(frames, 1))
        self.shortcut_out.bias.copy_(mean_d.repeat(frames))
        nn.init.zeros_(self.pixel_head.weight)
        if self.pixel_head.bias is not None:
            nn.init.zeros_(self.pixel_head.bias)
        self.bottleneck.zero_init_projection()

    def num_params(self) -> dict[str, int]:
        def count(mods: Any) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        counts = {
            "encoder": count([self.patch_embed, self.stems, self.encoder, self.encoder_norm])
            + (self.pos_embed.numel() if self.pos_embed is not None else 0),
            "bottleneck": count([self.bottleneck]),
            "decoder": count([self.decoder_in, self.decoder, self.decoder_norm, self.pixel_head, self.heads])
            + (self.decoder_pos_embed.numel() if self.decoder_pos_embed is not None else 0),
        }
        if self.pool_head is not None:
            counts["semantic"] = count([self.pool_head] + ([self.semantic_proj] if self.semantic_proj else []))
        if self.shortcut_in is not None:
            counts["shortcut"] = count([self.shortcut_in, self.shortcut_out])
        return counts
