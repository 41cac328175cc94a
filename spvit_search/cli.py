"""The `spvit` command line.

Bad input ends in a one-line `spvit: error: ...` and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys
import traceback
import warnings
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DEMO_PLAN = """\
spvit demo: the main job on the embedded digits dataset, end to end on the CPU.
  1. train a tiny dense ViT on digits (cached for reruns)
  2. build the FLOPs lookup table of its search space
  3. search under a 0.5x MACs budget
  4. export the searched subnet as a plain PyTorch model
  5. fine-tune it with soft knowledge distillation from the dense model
  6. evaluate dense vs subnet and write the report
Steps 1-6 land with the search, export and fine-tune issues; this build has the search space only."""


def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """`k=v` pairs as timm's train.py takes them; values are Python literals where they parse as one."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs expects key=value pairs, got '{item}'")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="supernet name, e.g. deit_tiny_patch16_224 (see list_supernets)")
    group.add_argument("--img-size", type=int, default=None, help="input image size (default: the model's)")
    group.add_argument("--num-classes", type=int, default=None, help="classifier classes (default: the model's)")
    group.add_argument(
        "--model-kwargs", nargs="*", default=[], metavar="K=V", help="extra timm model arguments, e.g. patch_size=4"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spvit", description="Prune vision transformers by architecture search.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lut = sub.add_parser(
        "lut",
        help="price every choice of a model's search space",
        description="Build the FLOPs (MACs) and params lookup table of a model's search space, print its dense, "
        "min and max MACs and a per-block table, and write it as CSV.",
    )
    add_model_arguments(lut)
    lut.add_argument("--convention", choices=("fvcore", "core", "spvit"), default="fvcore", help="how MACs count")
    lut.add_argument("--out", default=None, help="CSV file to write (default: print only)")

    sub.add_parser("demo", help="run the main job end to end on the embedded digits data", description=DEMO_PLAN)
    return parser


def run_lut(args: argparse.Namespace) -> None:
    from lookup_tables import build_lookup_table
    from supernets import build_supernet

    net = build_supernet(
        args.model, img_size=args.img_size, num_classes=args.num_classes, **parse_model_kwargs(args.model_kwargs)
    )
    lut = build_lookup_table(net, args.convention)
    low, high = lut.range()
    dense = lut.dense_flops()
    print(f"{args.model} at {net.img_size}px, {net.num_classes} classes, '{args.convention}' convention")
    print(f"dense {dense / 1e9:.4f} GMACs, {lut.params(net.dense_architecture()) / 1e6:.3f} M params")
    print(f"range {low / 1e9:.4f} .. {high / 1e9:.4f} GMACs ({low / dense:.3f}x .. {high / dense:.3f}x of dense)")
    print(lut.summary().to_string())
    if args.out:
        lut.save(args.out)
        print(f"wrote {args.out}")


COMMANDS = {"lut": run_lut, "demo": lambda args: print(DEMO_PLAN)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # fvcore's dependencies script functions at import; the deprecation is theirs to act on, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"spvit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("spvit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
