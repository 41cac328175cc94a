"""Device placement without a GPU: every family's supernet (architecture fixed) and exported subnet (BN folded or
not) run their eval-mode forward with CUDA parameters, buffers and inputs under `FakeTensorMode`, which propagates
shapes and devices without computing. A tensor made on the CPU inside a forward (`torch.tensor`, `torch.arange`,
`torch.zeros` without `device=`) fails with torch's mixed-device error; a plain-attribute tensor, which `.to()`
leaves behind, fails as a real tensor among fakes.

Subnets are built on the CPU and then faked: building one under the mode fails, because timm's constructor reads
its drop-path rates from a tensor on the host. Export's tensor work (`subnet_state_dict`) runs on the fake CUDA
supernet, and BN folding on the fake CUDA subnet.

Not covered: the gate-driven forwards. With no architecture fixed, eval mode reads each block's mixer from its gate
logits on the host (`int(...)` in `UnifiedAttention.current_mixer`) and its kept units by `nonzero`, whose size
depends on the data; the training-mode search forward reads its gate draw on the host too. A fake tensor has no
values to read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
import torch
from helpers import every_mixer_architecture
from test_cait import HIDDEN as CAIT_HIDDEN
from test_cait import MODEL as CAIT_MODEL
from test_cait import TINY as CAIT_TINY
from test_cait import TINY_ARCH as CAIT_ARCH
from test_family_contract import every_mixer
from test_sret_supernet import ARCHS as SRET_ARCHS
from test_sret_supernet import IMG as SRET_IMG
from test_sret_supernet import KWARGS as SRET_KWARGS
from test_sret_supernet import MODEL as SRET_MODEL
from test_sret_supernet import architecture as sret_architecture
from test_swin import SWIN_T
from test_swin import TINY as SWIN_TINY
from test_t2t_supernet import IMG as T2T_IMG
from test_t2t_supernet import random_architecture as t2t_architecture
from test_t2t_supernet import tiny_supernet as t2t_supernet
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from spvit_search.export import export_subnet, subnet_state_dict
from supernets import Architecture, Supernet, build_supernet

CLASSES = 10
BATCH = 2
CUDA = torch.device("cuda", 0)
VIT_ARCH = dict(model="test_vit", img_size=32, num_classes=CLASSES)


@dataclass(frozen=True)
class Family:
    img_size: int
    supernet: Callable[[], Supernet]  # a real supernet on the CPU
    architectures: Callable[[Supernet], list[Architecture]]  # together: every mixer, empty, cut and full MLPs


FAMILIES = {
    "vit": Family(
        32,
        lambda: build_supernet("test_vit", img_size=32, num_classes=CLASSES, patch_size=4),
        lambda net: [every_mixer_architecture(0, net.depth, net.mlp_hidden[0], **VIT_ARCH)],
    ),
    "cait": Family(
        32,
        lambda: build_supernet(CAIT_MODEL, **CAIT_TINY),
        lambda net: [every_mixer_architecture(0, net.depth, CAIT_HIDDEN, **CAIT_ARCH)],
    ),
    # A depth-4 supernet, so that one architecture at full depth holds every mixer; the other is cut to the
    # smallest depth. Both are slimmed to fewer heads than the supernet's four.
    "t2t_vit": Family(
        T2T_IMG,
        lambda: t2t_supernet(depth=4),
        lambda net: [t2t_architecture(net, 4, 2, seed=0), t2t_architecture(net, 2, 3, seed=1)],
    ),
    "sret": Family(
        SRET_IMG,
        lambda: build_supernet(SRET_MODEL, img_size=SRET_IMG, num_classes=CLASSES, **SRET_KWARGS),
        lambda net: [sret_architecture(net, *SRET_ARCHS[1])],  # every mixer, a sliced msa permuted
    ),
    # Four blocks in two stages, every mixer once; window attention shifted on blocks 1 and 3.
    "swin": Family(
        32,
        lambda: build_supernet(SWIN_T, img_size=32, num_classes=CLASSES, **SWIN_TINY),
        lambda net: [every_mixer(net.dense_architecture())],
    ),
}


def not_fake_cuda(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    return [name for name, t in tensors if not isinstance(t, FakeTensor) or t.device != CUDA]


def to_fake_cuda(model: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """`model` (in place) with every parameter and buffer a fake tensor of `mode` on cuda:0: the real tensors are
    faked on the CPU first, then moved, because a real `.to("cuda")` needs a GPU."""
    with mode:
        model._apply(lambda t: mode.from_tensor(t).to(CUDA))
    misplaced = not_fake_cuda([*model.named_parameters(), *model.named_buffers()])
    assert not misplaced, f"not fake CUDA tensors: {misplaced[:4]}"
    return model


def check_logits(logits: torch.Tensor) -> None:
    assert isinstance(logits, FakeTensor)
    assert logits.device == CUDA and logits.shape == (BATCH, CLASSES)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def built(family) -> Supernet:
    """Built once per family: building, not the fake forwards, is what takes time."""
    torch.manual_seed(0)
    return family.supernet().eval()


@pytest.fixture
def supernet(built) -> Supernet:
    """The family's real supernet on the CPU, in eval mode: a copy, which a test may fake."""
    return copy.deepcopy(built)


@pytest.fixture
def mode() -> FakeTensorMode:
    """A mode that takes no real tensors: one left behind in a forward is an error, not silently faked on the CPU."""
    return FakeTensorMode(allow_non_fake_inputs=False)


def images(family: Family, device: torch.device = CUDA) -> torch.Tensor:
    return torch.empty(BATCH, 3, family.img_size, family.img_size, device=device)


def test_supernet_with_fixed_architecture(family, supernet, mode):
    net = to_fake_cuda(supernet, mode)
    for arch in family.architectures(net):
        with mode, torch.no_grad():
            net.fix_architecture(arch)  # under the mode: it makes the kept units' index tensor on CUDA
            check_logits(net(images(family)))
        net.release_architecture()


def test_subnet_state_dict_stays_on_the_supernets_device(family, supernet, mode):
    """Export's tensor work (qkv rejoined, conv kernels mixed, MLPs cut, layer scales folded) on a CUDA supernet
    gives CUDA tensors of the shapes the CPU export gives."""
    archs = family.architectures(supernet)
    expected = [{k: v.shape for k, v in export_subnet(supernet, arch).state_dict().items()} for arch in archs]
    net = to_fake_cuda(supernet, mode)
    for arch, shapes in zip(archs, expected, strict=True):
        with mode, torch.no_grad():
            state = subnet_state_dict(net, arch)
        misplaced = not_fake_cuda(state.items())
        assert not misplaced, f"not fake CUDA tensors: {misplaced[:4]}"
        assert {k: v.shape for k, v in state.items()} == shapes


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn", "fold_bn"])
def test_exported_subnet(family, supernet, mode, fold_bn):
    for arch in family.architectures(supernet):
        # BN folded on the device: what `export_subnet(..., fold_bn=True)` does after taking the weights over.
        subnet = to_fake_cuda(export_subnet(supernet, arch), mode)
        with mode, torch.no_grad():
            if fold_bn:
                subnet.fold_batch_norm()
            check_logits(subnet(images(family)))


def test_mixed_devices_are_caught(family, supernet, mode):
    net = to_fake_cuda(supernet, mode)
    with mode, torch.no_grad():
        net.fix_architecture(family.architectures(net)[0])
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            net(images(family, torch.device("cpu")))


def test_tensors_left_behind_are_caught(mode):
    """A tensor in a plain attribute is neither a parameter nor a buffer: faking and `.to()` leave it real."""

    class Shifted(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.shift

    model = Shifted(4, 4)
    model.shift = torch.zeros(4)
    to_fake_cuda(model, mode)
    with mode, pytest.raises(AssertionError, match="Please convert all Tensors to FakeTensors first"):
        model(torch.empty(2, 4, device=CUDA))
