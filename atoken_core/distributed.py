"""Multi-process training on torch.distributed: FSDP2 (``fully_shard`` per transformer block),
meta-device construction, and sharded checkpoints through torch.distributed.checkpoint.

``atoken run`` is single-process unless it runs under ``torchrun`` (``WORLD_SIZE`` > 1) or is
given ``--nproc N`` (which re-launches itself through torchrun). CUDA ranks use NCCL, CPU
ranks gloo, so the same code path is tested on a laptop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn


@attrs.frozen
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed() -> DistEnv:
    """Join the process group torchrun describes in the environment (once per process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world == 1:
        return DistEnv(device=device)
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shard(model: nn.Module, mixed_precision: str) -> None:
    """FSDP2: every transformer block is its own unit (its parameters are gathered just before
    it runs and freed after), then the root takes what is left (embeddings, heads, W_r)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        # bf16 compute, fp32 master weights and gradient reduction (torchtitan's default)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blocks in (model.encoder, model.decoder):
        for block in blocks:
            fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # the trainer calls forward_all (both projections) rather than __call__: give it the same
    # gather-before / free-after hooks as forward
    register_fsdp_forward_method(model, "forward_all")


def build_sharded(build: Callable[[], nn.Module], env: DistEnv, mixed_precision: str,
                  build_meta: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Build on the meta device, shard, materialise only each rank's shard, then fill it from
    rank 0's freshly built (or loaded) full model. Rank 0 alone holds a full copy, briefly;
    every rank ends with the same weights a single process would have built. ``build_meta``
    builds the same architecture without touching values (defaults to ``build``)."""
    full = build() if env.is_main else None
    with torch.random.fork_rng(), torch.device("meta"):
        model = (build_meta or build)()
    shard(model, mixed_precision)
    model.to_empty(device=env.device)
    fill_from_rank0(model, full, env)
    return model


@torch.no_grad()
def fill_from_rank0(model: nn.Module, full: nn.Module | None, env: DistEnv) -> None:
    """Every rank's shard of ``model`` takes its values from ``full``, the same architecture
    unsharded, which only rank 0 holds (None elsewhere). Parameters are copied in place, so an
    optimizer built over ``model`` stays valid. Every rank must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are replicated, not sharded; non-persistent ones (RoPE frequencies, FSQ levels)
    # are not in the state dict, so send them all.
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buf in model.named_buffers():
        if env.is_main:
            buf.copy_(full_buffers[name].to(buf.device))
        dist.broadcast(buf, src=0)


def apply_to_full_model(model: nn.Module, fn: Callable[[nn.Module], None], build: Callable[[], nn.Module],
                        env: DistEnv) -> None:
    """Run ``fn`` (an in-place edit: import weights, set an initialisation) on the whole model.
    One process: on ``model`` itself. Under torchrun no rank holds the whole model, so rank 0
    loads the gathered weights into a fresh CPU copy from ``build`` (the same architecture),
    runs ``fn`` there (alone: an expensive ``fn`` is not repeated on every rank), and every
    rank's shard is refilled from the result. If ``fn`` fails, every rank raises its error
    (rather than waiting forever for rank 0). Every rank must call it."""
    if not env.distributed:
        fn(model)
        return
    import torch.distributed as dist

    state = full_state_dict(model)
    full, failure = None, [None]
    if env.is_main:
        try:
            # the throwaway initialisation must not consume random numbers: rank 0's stream
            # stays the single process's, which never builds this copy
            with torch.random.fork_rng():
                full = build()
            full.load_state_dict(state)
            fn(full)
        except Exception as err:
            failure[0] = err
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]
    fill_from_rank0(model, full, env)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state on rank 0 (CPU), {} elsewhere. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def mean_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return (t / env.world).tolist()


def mean_over_ranks_tensor(values: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """The ranks' mean of each entry of ``values`` (one all-reduce, no host read), as 0-d tensors."""
    if env.distributed:
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        values = values / env.world
    return list(values.unbind())


def all_true(flag: bool, env: DistEnv) -> bool:
    if not env.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1], device=env.device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def average_gradients(params: list[torch.Tensor], env: DistEnv) -> None:
    """Average the gradients of replicated (unsharded) parameters over the ranks, in place, in
    one all-reduce: FSDP2 averages the model's own gradients, not those of parameters outside
    it (the losses' learnable values), so without this every rank's copy drifts apart. A
    parameter none of the ranks gave a gradient keeps ``grad = None`` (the optimiser skips it,
    as in one process). Every rank must call it with the same parameters."""
    if not env.distributed or not params:
        return
    import torch.distributed as dist

    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=env.device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64) for p in params]
    flat = torch.cat([present, *grads])
    dist.all_reduce(flat)
    counts, flat = flat[: len(params)], flat[len(params):] / env.world
    offset = 0
    for p, count in zip(params, counts.tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if count > 0 else None
        offset += n


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, ...) on every rank -> the ranks' tensors stacked in rank order (world * B, ...) and
    where this rank's rows start, for a loss that compares each local sample with the whole
    data-parallel batch (SigLIP's sigmoid loss). Gradients flow through this rank's own rows
    only. Outside torchrun: ``(tensor, 0)``. Every rank must call it with the same B."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    rank = dist.get_rank()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[rank] = tensor
    return torch.cat(parts), rank * tensor.shape[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor stays as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def as_float(value: Any) -> float:
    """A scalar that may be a DTensor (e.g. FSDP2's gradient norm)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def save_sharded(folder: str, state: dict[str, Any]) -> None:
    """torch.distributed.checkpoint: each rank writes its shards; any world size can load them."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=folder)


def load_sharded(folder: str, state: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=folder)
