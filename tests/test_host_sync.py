"""kdbench.host_sync finds what would make the host wait for a GPU, on the CPU; the training
loop issues no such operation per step (only per epoch), whatever the method.

No GPU here or in CI: the detector watches the ATen operations issued (a TorchDispatchMode) and
the Tensor methods that copy to host memory, which are the same on every device. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` checks the same thing for real
(tests/test_fast_path.py, skipped without CUDA).
"""

from __future__ import annotations

import collections
import inspect

import pytest
import torch

from kdbench import registry, spectral
from kdbench.host_sync import BOOLEAN_INDEX, SYNCING_OPS, host_syncs, reported_names
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import train


def line_of(marker: str) -> int:
    """The line of this file holding ``marker`` (a comment): where a sync must be reported."""
    lines = inspect.getsource(inspect.getmodule(line_of)).splitlines()
    [number] = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# {marker}")]
    return number


def test_each_kind_of_sync_is_found_with_its_line_of_code():
    x = torch.randn(6, 4)
    with host_syncs() as found:
        x.sum().item()  # item
        if x.max() > 0:  # python-if
            pass
        x[x > 0].mean()  # mask
        torch.linalg.eigh(x.T @ x)  # eigh
        x.tolist()  # tolist
        torch.linalg.inv(x.T @ x + torch.eye(4))  # inv
        x.to("cpu")  # to-cpu
        torch.tensor(0.5, device=x.device)  # from-host
        torch.linalg.pinv(x)  # pinv
    where = [(sync.op, int(sync.where.split(":")[1].split()[0])) for sync in found]
    assert where == [
        ("aten._local_scalar_dense", line_of("item")),
        ("aten._local_scalar_dense", line_of("python-if")),
        ("aten.index", line_of("mask")),
        ("aten._linalg_eigh", line_of("eigh")),
        ("Tensor.tolist", line_of("tolist")),
        ("aten._linalg_check_errors", line_of("inv")),
        ("Tensor.to", line_of("to-cpu")),
        ("torch.tensor", line_of("from-host")),
        ("aten.linalg_pinv", line_of("pinv")),
    ]
    assert found[2].why == BOOLEAN_INDEX
    assert all(sync.where.startswith(__file__) for sync in found)


def test_the_same_values_without_a_sync_are_not_reported():
    x = torch.randn(6, 4)
    with host_syncs() as found:
        masked_mean = x.clamp_min(0).sum() / (x > 0).sum()  # RKD's normaliser, written sync-free
        torch.where(x > 0, x, 0.0)
        x.masked_fill(x < 0, 0.0)
        x[torch.tensor([0, 2])]  # an integer index has a known size
        torch.linalg.cholesky_ex(x.T @ x + torch.eye(4))  # _ex: the error code stays on the device
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        x.argmax(dim=1)
        filled = x.clone()
        filled[x < 0] = 0.0  # a scalar into a mask: ATen's masked_fill_, no nonzero()
        x.to(torch.float64)  # a dtype, not a device
        torch.tensor([1.0, 2.0], device="cpu")  # a host tensor, asked for as one
    assert found == []
    assert torch.allclose(masked_mean, x[x > 0].mean())


def test_the_wrapped_functions_are_restored_even_when_the_block_raises():
    originals = (torch.Tensor.cpu, torch.Tensor.to, torch.tensor)
    with pytest.raises(RuntimeError, match="inside"):
        with host_syncs():
            raise RuntimeError("inside")
    assert (torch.Tensor.cpu, torch.Tensor.to, torch.tensor) == originals
    assert "cpu" not in torch.Tensor.__dict__ and "to" not in torch.Tensor.__dict__
    with host_syncs() as found:
        pass
    torch.ones(2).tolist()  # outside the block: not recorded
    assert found == []


def test_nested_blocks_both_record_and_other_threads_are_not_recorded():
    import threading

    x = torch.randn(3)
    with host_syncs() as outer:
        with host_syncs() as inner:
            x.tolist()
            x.sum().item()
        x.cpu()  # the outer block still records after the inner one closed
        worker = threading.Thread(target=lambda: (x.cpu(), x.sum().item()))
        worker.start()
        worker.join()
    assert [sync.op for sync in inner] == ["Tensor.tolist", "aten._local_scalar_dense"]
    assert [sync.op for sync in outer] == ["Tensor.tolist", "aten._local_scalar_dense", "Tensor.cpu"]
    assert "tolist" not in torch.Tensor.__dict__


def test_every_listed_operation_is_a_name_a_method_may_declare():
    assert set(SYNCING_OPS) <= reported_names()
    assert {"aten.index", "aten.index_put", "Tensor.cpu"} <= reported_names()


# --- the training loop ----------------------------------------------------------------------------

def syncs_of_a_run(results, method: str, batch_size: int) -> collections.Counter:
    """(operation, line of code) → how often, over one whole train() of synthetic/tiny."""
    spec = RunSpec("synthetic/tiny", method, 0, overrides={"epochs": 1, "batch_size": batch_size})
    with host_syncs() as found:
        record = train(spec, Store(results))
    assert record["status"] == "done"
    return collections.Counter((sync.op, sync.where) for sync in found)


@pytest.mark.parametrize("method", registry.names())
def test_the_loop_synchronises_per_epoch_never_per_step(results_with_teacher, method):
    """Twice as many steps per epoch (half the batch) must not add a single synchronisation of
    the engine's: the loop's are per epoch (NaN check, metrics, evaluation, checkpoint). A
    method's declared ones (MHGD's eigh) are per step by nature and are the only ones that may
    grow; they must come from the method's own file, or from the engine's library of
    decompositions it calls (kdbench/spectral.py, which the loop itself never calls)."""
    method_class = registry.get(method)
    declared = set(method_class.host_syncs)
    coarse = syncs_of_a_run(results_with_teacher, method, batch_size=150)  # 8 steps per epoch
    fine = syncs_of_a_run(results_with_teacher, method, batch_size=75)  # 16 steps per epoch
    engine = lambda counts: {key: n for key, n in counts.items() if key[0] not in declared}
    assert engine(fine) == engine(coarse)
    assert sum(engine(coarse).values()) > 0  # the per-epoch reads are seen, so the probe works
    allowed = (inspect.getsourcefile(method_class), inspect.getsourcefile(spectral))
    for (op, where), n in fine.items():
        if op in declared:
            assert where.startswith(allowed), (op, where)
    if declared:
        grown = sum(n for (op, _), n in fine.items() if op in declared)
        assert grown > sum(n for (op, _), n in coarse.items() if op in declared)
