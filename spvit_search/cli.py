"""The `spvit` command line."""

from __future__ import annotations

import argparse
import sys

DEMO_PLAN = """\
spvit demo: the main job on the embedded digits dataset, end to end on the CPU.
  1. train a tiny dense ViT on digits (cached for reruns)
  2. build the FLOPs lookup table of its search space
  3. search under a 0.5x MACs budget
  4. export the searched subnet as a plain PyTorch model
  5. fine-tune it with soft knowledge distillation from the dense model
  6. evaluate dense vs subnet and write the report
Steps 1-6 land with the search, export and fine-tune issues; this build has the search space only."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spvit", description="Prune vision transformers by architecture search.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="run the main job end to end on the embedded digits data", description=DEMO_PLAN)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print(DEMO_PLAN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
