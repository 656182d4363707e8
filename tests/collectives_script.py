"""Run under torchrun by tests/test_distributed.py: counts FSDP2's gradient reduce-scatters in
each optimiser step of a two-modality round robin, and writes them to the JSON file argv[1]."""

import json
import sys

import torch.distributed as dist


def main() -> None:
    from atoken_core.plugin_manager import get_registries
    from atoken_core.recipe import load_recipe
    from atoken_core.train import Run

    out, recipe_path, *sets = sys.argv[1:]
    registries = get_registries()
    recipe = load_recipe(recipe_path, registries, sets)
    run = Run(recipe, registries, out + ".run", progress=False)
    calls = [0]

    def counted(original):
        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)
        return counting

    # FSDP2 calls whichever of these its torch version has, through the module
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name)))
    per_step = []
    for step in range(2):
        calls[0] = 0
        row = run.train_step(step)
        per_step.append({"reduce_scatters": calls[0], "finite": row["finite"],
                         "micro_steps": len(run.curriculum.modality_schedule(run.plans[0], step))})
    if run.env.is_main:
        with open(out, "w") as f:
            json.dump({"steps": per_step, "units": len(run.model.encoder) + len(run.model.decoder) + 1}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    import os

    main()
    # The counts are written; skip interpreter teardown, where gloo's threads sometimes abort the
    # process ("terminate called without an active exception", exit -6) after the work is done.
    sys.stdout.flush()
    os._exit(0)
