"""Apple's released AToken weights (github.com/apple/ml-atoken) as atoken checkpoints.

Adds ``atoken import-official CHECKPOINT.pt --config CONFIG.yaml -o OUT.safetensors``. The
conversion itself (``convert.py``) is imported only when the command runs; this module stays
cheap to import, as every plugin module must.

Apple's weights are not part of atoken and never downloaded by it: users fetch them under
Apple's terms (see :data:`WEIGHTS_TERMS`), which every converted file repeats in its metadata.
"""

from __future__ import annotations

import argparse

from atoken_core import hookimpl

WEIGHTS_TERMS = (
    "Apple ML Research Model Terms of Use (MODEL-LICENSE of github.com/apple/ml-atoken): research use only, "
    "non-commercial; models derived from these weights (fine-tunes included) fall under the same terms. "
    "atoken does not redistribute them."
)


def _run_import(args: argparse.Namespace) -> int:
    from atoken_official.convert import import_official

    report = import_official(args.checkpoint, args.config, args.output, name=args.name)
    print(f"{args.checkpoint}: {report['tensors']} tensors, {report['parameters']:,} parameters "
          f"(flavour {report['flavor']}{' with overrides' if report['overrides'] else ''}, "
          f"{report['bottleneck']} bottleneck) -> {args.output}")
    if report["ignored"]:
        print(f"  ignored {report['ignored']} training-only tensors (lpips_loss.*)")
    print(f"  weights' terms: {WEIGHTS_TERMS}")
    return 0


@hookimpl
def atoken_add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-official",
        help="Apple's AToken checkpoint (.pt + its YAML) -> an atoken checkpoint (.safetensors)",
        description="Convert a checkpoint of github.com/apple/ml-atoken (atoken-soc.pt, atoken-sod.pt, "
                    "atoken-soc-s1.pt, atoken-soc-s2.pt) into an atoken checkpoint that atoken encode/decode/eval, "
                    "atoken.load and fine-tuning recipes read. The .pt is read with torch.load(weights_only=True) "
                    "only. Any width and depth the YAML's arch_cfg describes is accepted.")
    p.add_argument("checkpoint", help="the official .pt (local path or fsspec URI)")
    p.add_argument("--config", required=True, help="its YAML from the official configs/ folder (e.g. atoken-soc.yaml)")
    p.add_argument("-o", "--output", required=True, help="where to write the atoken checkpoint (.safetensors)")
    p.add_argument("--name", help="the run name stored in the checkpoint's recipe (default: the file's stem)")
    p.set_defaults(func=_run_import)
