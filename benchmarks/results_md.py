"""What every benchmark shares: the machine's description and the results it writes (JSON and RESULTS.md)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    return f"{os.cpu_count()}-core CPU ({cpu})"


def study_record(name: str, args: argparse.Namespace, minutes: float) -> dict[str, Any]:
    """The head of a CPU study's JSON results: what ran, when, where, with which settings, for how long."""
    return {
        "benchmark": name,
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(torch.device("cpu")),
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "minutes": minutes,
    }


def generated_block(name: str, body: str) -> str:
    """`body` between the markers that a fresh run of benchmark `name` replaces in RESULTS.md."""
    begin = f"<!-- {name}: begin generated table ({name}.py --update-results replaces it) -->"
    return f"{begin}\n{body}\n<!-- {name}: end generated table -->"


def update_results_md(name: str, block: str, path: Path = RESULTS_MD) -> None:
    """Replace benchmark `name`'s generated block in its `## name` section (adding the section if it has none);
    the hand-written text around the block and every other section stay."""
    section_title = f"## {name}"
    begin, end = block.splitlines()[0], block.splitlines()[-1]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = re.search(rf"^{re.escape(section_title)}[ \t]*$", text, re.MULTILINE)
    if start is None:
        path.write_text(f"{text.rstrip()}\n\n{section_title}\n\n{block}\n")
        return
    following = re.search(r"^## ", text[start.end() :], re.MULTILINE)
    stop = start.end() + following.start() if following else len(text)
    section = text[start.start() : stop]
    if begin in section and end in section:
        section = section[: section.index(begin)] + block + section[section.index(end) + len(end) :]
    else:
        section = f"{section_title}\n\n{block}\n\n"
    path.write_text((text[: start.start()] + section + text[stop:]).rstrip() + "\n")


def save_results(name: str, results: dict[str, Any], table: str, body: str, out: Path, update: bool) -> None:
    """Print the table, write the JSON results to `out`, and with `update` refresh RESULTS.md."""
    print(f"\n{table}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    if update:
        update_results_md(name, generated_block(name, body))
        print(f"updated the ## {name} section of {RESULTS_MD}")
