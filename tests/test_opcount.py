"""What one optimizer step dispatches on ResNet-56: op budgets, host syncs, no growth with the step.

On a GPU these small ResNets are bound by kernel launches, so a change that makes a step
dispatch more ops (or launch more kernels) slows training there although the CPU, where the
tests run, may not notice. The budgets below are the counts measured after ``build_optimizer``
gave every optimizer its fewest groups and SGDG stacked its layers, plus about 10% (rounded
up); PSI-SGD(M)'s are issue 18's targets (their flat buffers: a fixed count whatever the depth,
ResNet-20's within 2 of ResNet-56's). Re-measure with

    python -m psi.bench ops --models resnet56

which printed (torch 2.13.0+cpu), as aten ops / estimated GPU kernels: sgd 5/3, adam 126/11,
sgdg 145/111, psi-sgd 19/22, psi-sgdm 22/28 (before the flat buffers 78/179 and 133/234), sgdp 3026/2018.
A change that lowers a count should lower its budget too.
"""

import pytest
import torch

from psi.bench.cli import main
from psi.bench.steps import StepCounter, step_ops
from psi.engine.optimizers import OPTIMIZERS

OPS_BUDGET = {"sgd": 7, "adam": 141, "sgdg": 161, "psi-sgd": 20, "psi-sgdm": 24, "sgdp": 3696}
KERNEL_BUDGET = {"sgd": 5, "adam": 15, "sgdg": 124, "psi-sgd": 25, "psi-sgdm": 31, "sgdp": 2404}

# Host syncs of one step. adamp's SGDP (third party, not in the paper) decides per weight tensor
# with `if cosine.max() < ...`: one sync for each scale-invariant layer (55, its channel test
# holds) and two for the classifier (both tests fail). Adam's 110 `.item()` reads of its `step`
# counters are not syncs: torch keeps those on the CPU (StepCounter counts them apart).
SYNCS = {"sgd": 0, "adam": 0, "sgdg": 0, "psi-sgd": 0, "psi-sgdm": 0, "sgdp": 57}


@pytest.fixture(scope="module")
def counts():
    return {name: step_ops(name, "resnet56", at=(2, 10)) for name in OPTIMIZERS}


def test_the_tables_cover_every_optimizer():
    assert set(OPS_BUDGET) == set(KERNEL_BUDGET) == set(SYNCS) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_stays_within_its_budgets(name, counts):
    c = counts[name][2]
    assert c.ops <= OPS_BUDGET[name], f"{name}: a step dispatches {c.ops} ops, budget {OPS_BUDGET[name]} (module doc)"
    assert c.kernels <= KERNEL_BUDGET[name], f"{name}: {c.kernels} GPU kernels, budget {KERNEL_BUDGET[name]}"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_host_syncs_per_step(name, counts):
    assert counts[name][2].syncs == SYNCS[name]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_count_does_not_depend_on_the_step(name, counts):
    assert counts[name][10] == counts[name][2]


@pytest.mark.parametrize("name", ["psi-sgd", "psi-sgdm"])
def test_psi_step_does_not_grow_with_depth(name, counts):
    shallow = step_ops(name, "resnet20", at=(2,))[2]
    assert abs(shallow.ops - counts[name][2].ops) <= 2, (shallow.ops, counts[name][2].ops)


def test_groups_are_the_fewest(counts):
    assert {name: c[2].groups for name, c in counts.items()} == {
        "sgd": 1, "adam": 2, "sgdg": 2, "psi-sgd": 2, "psi-sgdm": 2, "sgdp": 1}


def test_adam_reads_only_its_host_step_counters(counts):
    assert counts["adam"][2].host_reads == 2 * 55  # two per scale-invariant tensor (bias corrections 1 and 2)
    assert all(c[2].host_reads == 0 for name, c in counts.items() if name != "adam")


def test_kernel_estimate():
    xs, ys = [torch.randn(4, 3), torch.randn(6, 3)], [torch.randn(4, 3), torch.randn(6, 3)]
    cols = [torch.randn(4, 1), torch.randn(6, 1)]
    step = torch.tensor(1.0)
    with StepCounter([step]) as c:
        torch._foreach_mul(xs, ys)  # one fused kernel
        torch._foreach_mul(xs, cols)  # broadcast: CUDA's slow path, a kernel per tensor
        xs[0].view(12).unsqueeze(0)  # views: none
        step.add_(1)  # a host tensor: none
        step.item()  # a host read, not a sync
        xs[0].sum().item()  # a kernel, then a sync
    assert (c.kernels, c.total, c.host_reads, c.device_syncs) == (1 + 2 + 1, 8, 1, 1)


def test_ops_benchmark_prints_every_optimizer(capsys):
    main(["ops", "--models", "resnet20"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in OPTIMIZERS) and "1.00" in out
