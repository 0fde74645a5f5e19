"""The repeat path's direct relaunch (GPU-only at run time: the interpreter hands back no compiled
kernel), checked on the CPU with a stand-in for Triton's compiled kernel; and the single-launch
step's grid from CUDA's occupancy query, with a stand-in driver."""

import inspect
import types

import pytest
import torch
import triton
from mgg_fast.kernels import mgg_step, mgg_step_single, relaunch
from triton.compiler.compiler import CompiledKernel


class FakeCompiled:
    """Records launches like ``CompiledKernel[grid](*args)``."""

    function = object()

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


class FakeJIT:
    def __init__(self, compiled):
        self.compiled = compiled

    def __getitem__(self, grid):
        return lambda *args, **options: self.compiled


def test_relaunch_passes_addresses_and_keeps_tensors_alive():
    compiled = FakeCompiled()
    t = torch.zeros(4)
    r = relaunch.launch(FakeJIT(compiled), 7, (t, 3, 0.5, "CONST"), num_warps=1)
    assert r.args == (t.data_ptr(), 3, 0.5, "CONST") and r.tensors == (t,)
    r()
    assert compiled.launches == [((7, 1, 1), (t.data_ptr(), 3, 0.5, "CONST"))]


class LauncherCompiled(FakeCompiled):
    """Also has the launcher that ``CompiledKernel[grid]`` calls (``run``), as Triton's does."""

    packed_metadata = (1, 1, 0)

    def __init__(self):
        super().__init__()
        self.direct = []

    def run(self, *args):
        self.direct.append(args)


def test_relaunch_calls_the_launcher_directly_unless_a_hook_is_registered(monkeypatch):
    monkeypatch.setattr(relaunch, "current_stream", lambda device: ("stream", device))
    compiled = LauncherCompiled()
    t = torch.zeros(4)
    r = relaunch.launch(FakeJIT(compiled), 7, (t, 3, 0.5))
    r()
    launcher_args = (7, 1, 1, ("stream", None), compiled.function, (1, 1, 0), None, None, None)
    assert compiled.direct == [(*launcher_args, t.data_ptr(), 3, 0.5)] and compiled.launches == []
    hook = lambda metadata: None
    triton.knobs.runtime.launch_exit_hook.add(hook)
    try:
        r()  # a profiler's hook sees the launch, with its metadata: the public way
    finally:
        triton.knobs.runtime.launch_exit_hook.remove(hook)
    assert compiled.launches == [((7, 1, 1), (t.data_ptr(), 3, 0.5))] and len(compiled.direct) == 1
    r()
    assert len(compiled.direct) == 2


def test_triton_launches_compiled_kernels_the_way_the_direct_relaunch_does():
    """The direct relaunch passes what CompiledKernel[grid] passes to its launcher, minus the
    hooks: this fails if a Triton version changes that calling convention."""
    source = " ".join(inspect.getsource(CompiledKernel.__getitem__).split())
    assert (
        "self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, "
        "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)"
    ) in source


def test_launch_without_a_compiled_kernel_gives_no_relaunch():
    assert relaunch.launch(FakeJIT(None), 1, ()) is None


def test_update_relaunch_replaces_exactly_the_scalar_arguments():
    """SCALARS must sit where both step kernels take step_scalars(); everything else stays."""
    names = list(inspect.signature(mgg_step._mgg_step_kernel.fn).parameters)
    scalar_names = [
        "lr",
        "beta1",
        "one_minus_beta1",
        "ln_beta1",
        "beta2",
        "one_minus_beta2",
        "ln_beta2",
        "eps",
    ]
    assert names[mgg_step.SCALARS] == scalar_names
    single = list(inspect.signature(mgg_step_single._mgg_step_single_kernel.fn).parameters)
    assert single[mgg_step.SCALARS] == scalar_names, "rebind_update serves the single launch too"
    compiled = FakeCompiled()
    args = tuple(range(len(names)))
    first = relaunch.Relaunch(compiled[(5, 1, 1)], args, ())
    (rebound,) = mgg_step.rebind_update([first], lr=0.25, beta1=0.5, beta2=0.75, eps=1e-6)
    assert compiled.launches == [], "rebinding launches nothing"
    rebound()
    ((_, launched),) = compiled.launches
    expect = mgg_step.step_scalars(0.25, 0.5, 0.75, 1e-6)
    assert launched[mgg_step.SCALARS] == expect
    assert launched[: mgg_step.SCALARS.start] == args[: mgg_step.SCALARS.start]
    assert launched[mgg_step.SCALARS.stop :] == args[mgg_step.SCALARS.stop :]


def test_optimizer_repeat_rebinds_only_when_hyper_parameters_change():
    """The repeat path launches its stored (runner, args) as they are while lr/betas/eps stay, and
    rebinds the update launches (never the prologue's) when they change. Stand-in compiled
    kernels, since the interpreter hands back none."""
    from mgg_fast import MGG, MGGOptimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter
    params = [torch.zeros(5, device=device, requires_grad=True)]
    params[0].grad = torch.ones(5, device=device)
    opt = MGGOptimizer(params, MGG().to(device), lr=0.1, backend="triton")
    opt.step()
    (record,) = opt._repeats
    n_args = len(inspect.signature(mgg_step._mgg_step_kernel.fn).parameters)
    compiled = FakeCompiled()
    prologue = relaunch.Relaunch(compiled[("prologue",)], ("P",) * 10, ())
    update = relaunch.Relaunch(compiled[("update",)], tuple(range(n_args)), ())
    record.compiled = [(None, prologue), (0, update)]
    opt.step()
    assert compiled.launches == [(("prologue",), prologue.args), (("update",), update.args)]
    compiled.launches.clear()
    opt.param_groups[0]["lr"] = 0.25
    opt.param_groups[0]["betas"] = [0.5, 0.75]  # a list (as load_state_dict may leave it) is fine
    opt.step()
    (_, p_args), (_, u_args) = compiled.launches
    assert p_args == prologue.args
    assert u_args[mgg_step.SCALARS] == mgg_step.step_scalars(0.25, 0.5, 0.75, 1e-8)
    assert u_args[: mgg_step.SCALARS.start] == update.args[: mgg_step.SCALARS.start]
    compiled.launches.clear()
    opt.step()
    assert compiled.launches[1][1] == u_args, "bound once, launched as bound"


def test_resident_programs_asks_cuda_for_blocks_per_multiprocessor(monkeypatch):
    """The grid of the single-launch step: CUDA's occupancy for the compiled kernel's function,
    threads and shared memory, times the multiprocessors (stand-ins for the driver and kernel)."""
    calls, status = [], [0]

    class FakeDriver:
        def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, blocks, function, threads, shared):
            calls.append((function.value, threads.value, shared.value))
            blocks._obj.value = 6
            return status[0]

    class Compiled(FakeCompiled):
        function = 1234
        metadata = types.SimpleNamespace(num_warps=2, shared=16)

    monkeypatch.setattr(mgg_step_single, "_libcuda", FakeDriver)
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert mgg_step_single.resident_programs(Compiled(), torch.device("cuda")) == 6 * 132
    assert calls == [(1234, 64, 16)]
    status[0] = 2
    with pytest.raises(RuntimeError, match="occupancy"):
        mgg_step_single.resident_programs(Compiled(), torch.device("cuda"))
