"""RIFormer's affine skip and module imitation: at init the affine skip is the identity skip; random s, t and norms
fold exactly into one norm at export in every family; the lookup table prices the fold as fvcore counts it; the
imitation losses are the hand-computed ones, and zero when the student is the teacher; the commands take both."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import fvcore_macs, max_difference, outputs, randomize_
from test_family_contract import CLASSES, TINY_MODELS, images
from test_t2t_supernet import random_architecture as t2t_architecture
from test_t2t_supernet import tiny_supernet as t2t_supernet

from finetune.imitation import ImitationWeights, ModuleImitation, token_relation
from lookup_tables import build_lookup_table
from lookup_tables.counting import CORE_OPERATORS
from spvit_search.cli import main
from spvit_search.export import dense_subnet, export_subnet, load_subnet, save_subnet, with_affine_skips
from spvit_search.finetuning import _imitation_teacher
from supernets import MIXERS, Architecture, BlockChoice, GateConfig
from supernets.family import family_of_model
from supernets.registry import create_source_model

AFFINE = GateConfig(skip_mixer="affine")


def source_model(family):
    name, img_size, kwargs = TINY_MODELS[family]
    torch.manual_seed(0)
    return name, kwargs, randomize_(create_source_model(name, img_size=img_size, num_classes=CLASSES, **kwargs), 1)


def supernets(family):
    """(identity supernet, affine supernet) of the family's tiny source model, eval mode."""
    name, kwargs, source = source_model(family)
    supernet_class = family_of_model(source).supernet_class
    identity = supernet_class(source.eval(), name, model_kwargs=kwargs).eval()
    return identity, supernet_class(source, name, model_kwargs=kwargs, gates=AFFINE).eval()


def skipping(arch: Architecture) -> Architecture:
    """Every other block a skip, the rest cycling through the other mixers; every other hidden unit kept."""
    mixers = [m for m in MIXERS if m != "skip"]
    blocks = [BlockChoice("skip" if i % 2 == 0 else mixers[i // 2 % 3], b.mlp_kept[::2]) for i, b in
              enumerate(arch.blocks)]  # fmt: skip
    return dataclasses.replace(arch, blocks=tuple(blocks))


FAMILIES = sorted(TINY_MODELS, key=str)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_at_init_the_affine_skip_is_the_identity_skip(family):
    identity, affine = supernets(family)
    x = images(affine, 2)
    arch = skipping(identity.dense_architecture())
    with torch.no_grad():
        torch.testing.assert_close(affine(x), identity(x), rtol=0, atol=0)  # dense: no skip at all
        identity.fix_architecture(arch)
        affine.fix_architecture(dataclasses.replace(arch, skip_mixer="affine"))
        assert torch.equal(affine(x), identity(x))


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_random_affine_skips_fold_exactly_into_the_norm(family, tmp_path):
    _, net = supernets(family)
    randomize_(net, seed=2)  # s, t, every norm and layer scale random
    arch = skipping(net.dense_architecture())
    assert arch.skip_mixer == "affine" and "skip" in arch.mixers
    x = images(net, 2)
    net.fix_architecture(arch)
    expected = outputs(net, x)
    net.release_architecture()
    subnet = export_subnet(net, arch)
    assert max_difference(outputs(subnet, x), expected) <= 1e-5
    save_subnet(subnet, tmp_path / "subnet")
    loaded = load_subnet(tmp_path / "subnet")
    assert loaded.arch.skip_mixer == "affine"
    assert max_difference(outputs(loaded, x), expected) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_lookup_table_prices_the_affine_skip_as_its_export(family):
    _, net = supernets(family)
    arch = skipping(net.dense_architecture())
    fvcore, core = build_lookup_table(net, "fvcore"), build_lookup_table(net, "core")
    counts = fvcore_macs(export_subnet(net, arch), net.img_size)
    assert fvcore.flops(arch) == pytest.approx(sum(counts.values()), rel=1e-3)
    assert core.flops(arch) == pytest.approx(sum(n for op, n in counts.items() if op in CORE_OPERATORS), rel=1e-3)
    skip = fvcore.to_frame().query("block == 1 and item == 'mixer' and choice == 'skip'").iloc[0]
    assert skip.macs > 0 and core.to_frame().query("block == 1 and choice == 'skip'").iloc[0].macs == 0
    if family in (None, "cait", "swin"):  # the folded norm's γ' and β', D each (SReT keeps its residual scalars)
        assert skip.params == 2 * net.blocks[1].norm1.weight.numel()


def test_identity_and_affine_tables_and_architectures_do_not_mix(tmp_path):
    identity, affine = supernets(None)
    lut = build_lookup_table(affine)
    lut.save(tmp_path / "lut.csv")
    assert json.loads((tmp_path / "lut.csv").read_text().splitlines()[0][2:])["skip_mixer"] == "affine"
    with pytest.raises(ValueError, match="skip_mixer: the lookup table prices 'affine' skips"):
        lut.flops(identity.dense_architecture())
    with pytest.raises(ValueError, match="prices 'affine' skips, the supernet's are 'identity'"):
        lut.check_supernet(identity)
    with pytest.raises(ValueError, match="skip_mixer: the architecture's skip blocks are 'identity'"):
        affine.fix_architecture(identity.dense_architecture())
    arch = affine.dense_architecture()
    assert '"skip_mixer": "affine"' in arch.to_json() and "skip_mixer" not in identity.dense_architecture().to_json()
    assert Architecture.from_json(arch.to_json()) == arch


def test_search_trains_s_and_t_when_the_skip_is_drawn():
    _, net = supernets(None)
    net.train()
    for block in net.blocks:  # every gate off: every block draws the skip
        block.attn.gates.logits.data.fill_(-20.0)
    net(images(net, 2)).square().sum().backward()
    for block in net.blocks:
        assert block.attn.skip_affine.scale.grad.abs().sum() > 0 and block.attn.skip_affine.shift.grad is not None
        assert block.attn.v.weight.grad is None  # single path: the other candidates do not train


def test_with_affine_skips_keeps_what_the_subnet_computes():
    identity, _ = supernets("sret")
    subnet = export_subnet(randomize_(identity, seed=3), skipping(identity.dense_architecture()))
    affine = with_affine_skips(subnet)
    assert affine.arch.skip_mixer == "affine"
    x = images(identity, 2)
    assert max_difference(outputs(affine, x), outputs(subnet, x)) <= 1e-6
    assert any(isinstance(b.mixer, torch.nn.Identity) for b in affine.blocks)


def block_streams(model, x):
    """The inputs and outputs of every block of a ViT subnet, by hand."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x).flatten(1, -2)))
    inputs, outs = [], []
    for block in model.blocks:
        inputs.append(tokens)
        tokens = block(tokens)
        outs.append(tokens)
    return inputs, outs


def test_imitation_losses_are_the_hand_computed_ones_and_zero_for_the_teacher():
    name, kwargs, source = source_model(None)
    teacher = dense_subnet(source, name, kwargs).eval()
    net = family_of_model(source).supernet_class(source, name, model_kwargs=kwargs)
    arch = skipping(net.dense_architecture())
    student = export_subnet(randomize_(net, seed=4), arch).train()
    pruned = [b.mixer != "msa" for b in arch.blocks]
    weights = ImitationWeights(out=0.3, block=0.2, relation=0.1)
    imitation = ModuleImitation(student.blocks, teacher.blocks, lambda i: pruned[i], weights)
    x = images(net, 3)
    student(x)
    with torch.no_grad():
        teacher(x)
    terms = imitation.losses()
    imitation.remove()
    with torch.no_grad():
        s_in, s_out = block_streams(student, x)
        _, t_out = block_streams(teacher, x)
        out = torch.stack([F.mse_loss(student.blocks[i].mixer_branch(s_in[i]), teacher.blocks[i].mixer_branch(s_in[i]))
                           for i in range(len(pruned)) if pruned[i]]).mean()  # fmt: skip
        block = torch.stack([F.mse_loss(s, t) for s, t in zip(s_out, t_out, strict=True)]).mean()
        relation = F.mse_loss(token_relation(s_out[-1]), token_relation(t_out[-1]))
    for key, value in (("imitation_out", out), ("imitation_block", block), ("imitation_relation", relation)):
        torch.testing.assert_close(terms[key], value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["imitation"], 3 * (0.3 * out + 0.2 * block + 0.1 * relation), rtol=1e-5, atol=0)
    assert out > 0 and block > 0

    same = copy.deepcopy(teacher).train()
    imitation = ModuleImitation(same.blocks, teacher.blocks, lambda i: True)  # every block compared
    same(x)
    with torch.no_grad():
        teacher(x)
    zero = imitation.losses()
    assert all(zero[k] == 0 for k in ("imitation", "imitation_out", "imitation_block", "imitation_relation"))


def test_imitation_refuses_a_teacher_of_another_width():
    net = t2t_supernet(depth=4)
    subnet = export_subnet(net, t2t_architecture(net, 2, 2, seed=0))  # 2 blocks, 2 heads of the supernet's 4
    with pytest.raises(ValueError, match="subnet of reduced width cannot imitate its dense model"):
        _imitation_teacher(export_subnet(net, net.dense_architecture()), subnet, net.name, {})


def test_search_and_finetune_take_the_affine_skip_and_imitation(image_folder, tmp_path):
    model = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]
    model += ["--data", str(image_folder), "--batch-size", "4"]
    run, subnet, tuned = tmp_path / "search", tmp_path / "subnet", tmp_path / "finetune"
    search = ["search", *model, "--out", str(run), "--target", "0.5x", "--epochs", "1", "--skip-mixer", "affine"]
    assert main([*search, "--imitation"]) == 0
    assert Architecture.load(run / "arch.json").skip_mixer == "affine"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("imitation_out" in r for r in steps)
    assert main(["export", "--run", str(run), "--out", str(subnet), "--skip-mixer", "identity"]) == 0
    assert load_subnet(subnet).arch.skip_mixer == "identity"
    finetune = ["finetune", "--subnet", str(subnet), "--out", str(tuned), "--epochs", "1", "--no-progress"]
    finetune += ["--data", str(image_folder), "--batch-size", "4"]
    assert main([*finetune, "--imitation", "--skip-mixer", "affine"]) == 0
    assert Architecture.load(tuned / "best" / "arch.json").skip_mixer == "affine"
    steps = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert {"kd", "imitation", "imitation_out", "imitation_block", "imitation_relation"} <= set(steps[0])
