"""MGGOptimizer on DTensor parameters: FSDP2 (``fully_shard``) and plain DTensors, both backends,
against one process stepping the full parameters; DCP resume across world sizes; clear errors
on every rank before anything changes.

All scenarios share one pair of spawned gloo processes on 127.0.0.1 (a process start costs
seconds); each rank saves what it saw and the tests below check it.
"""

from pathlib import Path

import pytest
import torch
from helpers import F32, random_mgg
from torch import nn
from torch.testing import assert_close

from mgg_fast import MGGOptimizer
from mgg_fast.testing import run_local_processes

LR, BETAS = 0.05, (0.9, 0.99)
BACKENDS = ("reference", "triton", "cpu")
WORLD = 2


def tiny_model() -> nn.Module:
    """Uneven shards over 2 ranks (5 rows: 3 + 2) and parameters whose shard on rank 1 is empty
    (1 row)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 1))


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(100 * rank + step))


def mgg_opt(params, backend: str) -> MGGOptimizer:
    return MGGOptimizer(params, random_mgg(seed=3), lr=LR, betas=BETAS, backend=backend)


def train(model, opt, steps, ranks) -> None:
    """Steps whose gradient is the mean of the losses on the batches of ``ranks`` (FSDP2 averages
    the gradients of the ranks; one process takes the mean over their batches)."""
    for s in steps:
        opt.zero_grad()
        loss = sum(model(batch(r, s)).pow(2).mean() for r in ranks) / len(ranks)
        loss.backward()
        opt.step()


def full_params(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.named_parameters()
    }


def sharded(model, mesh):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=mesh)


def full_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {k: {n: torch.as_tensor(t).clone() for n, t in v.items()} for k, v in sd["state"].items()}


def _fsdp_scenario(rank, mesh) -> dict:
    """4 steps of FSDP2 on both backends vs one process on the full model; the gathered full
    state; and local-shard facts (state entries are DTensors with the parameter's placements)."""
    out = {}
    for backend in BACKENDS:
        single = tiny_model()
        single_opt = mgg_opt(list(single.parameters()), backend)
        train(single, single_opt, range(4), range(WORLD))
        model = sharded(tiny_model(), mesh)
        opt = mgg_opt(list(model.parameters()), backend)
        train(model, opt, range(4), [rank])
        names = [n for n, _ in model.named_parameters()]
        p_last = dict(model.named_parameters())["2.bias"]
        st = opt.state[p_last]
        out[backend] = {
            "sharded": full_params(model),
            "single": full_params(single),
            "full_state": full_state(model, opt),
            "single_state": {
                n: {k: v.clone() for k, v in single_opt.state[p].items()}
                for n, p in zip(names, single.parameters(), strict=True)
            },
            "local_numels": [p.to_local().numel() for p in model.parameters()],
            "state_local_numel": st["exp_avg"].to_local().numel(),
            "state_placements_match": all(
                opt.state[p][k].placements == p.placements and opt.state[p][k].device_mesh == p.device_mesh
                for p in model.parameters()
                for k in ("exp_avg", "exp_avg_sq", "memory_W", "memory_b")
            ),
            "memory_W_shape": list(opt.state[dict(model.named_parameters())["0.weight"]]["memory_W"].shape),
            "step_is_plain": all(type(opt.state[p]["step"]) is torch.Tensor for p in model.parameters()),
        }
    return out


def _plain_dtensor_scenario(rank, mesh) -> dict:
    """Tensor-parallel-like DTensors (a column shard, uneven, and a replicated vector) with
    gradients set directly, vs the same on full tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(7)
    full = [torch.randn(4, 5, generator=gen), torch.randn(3, generator=gen)]
    placements = [[Shard(1)], [Replicate()]]
    out = {}
    for backend in BACKENDS:
        plain = [t.clone().requires_grad_(True) for t in full]
        dts = [
            nn.Parameter(distribute_tensor(t.clone(), mesh, pl))
            for t, pl in zip(full, placements, strict=True)
        ]
        opts = mgg_opt(plain, backend), mgg_opt(dts, backend)
        for s in range(3):
            grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(s)) for t in full]
            for p, q, g, pl in zip(plain, dts, grads, placements, strict=True):
                p.grad = g
                q.grad = distribute_tensor(g, mesh, pl)
            for opt in opts:
                opt.step()
        out[backend] = {"dtensor": [q.full_tensor() for q in dts], "plain": [p.detach() for p in plain]}
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _snapshot(model, opt):
    state = {id(p): {k: _local(v).clone() for k, v in st.items()} for p, st in opt.state.items()}
    return full_params(model), state


def _same_snapshot(a, b) -> bool:
    params_a, state_a = a
    params_b, state_b = b
    return all(_same(params_a[k], params_b[k]) for k in params_a) and all(
        _same(state_a[i][k], state_b[i][k]) for i in state_a for k in state_a[i]
    )


def _errors_scenario(rank, mesh) -> dict:
    """Unsupported input raises a clear error on every rank (the same one, or 'another rank
    rejected' where only one rank's input is bad) and changes nothing; a NaN in one rank's
    gradient shard skips the step on both."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    model = sharded(tiny_model(), mesh)
    opt = mgg_opt(list(model.parameters()), "reference")
    train(model, opt, range(1), [rank])
    p = dict(model.named_parameters())["0.weight"]
    errors = {}

    def attempt(name, prepare):
        train_grads(model, rank)
        restore = prepare()
        before = _snapshot(model, opt)
        try:
            opt.step()
            errors[name] = None
        except (ValueError, TypeError, RuntimeError) as err:
            errors[name] = f"{type(err).__name__}: {err}"
        errors[name + "/unchanged"] = _same_snapshot(before, _snapshot(model, opt))
        if restore:
            restore()

    def replicated_grad():
        p.grad = distribute_tensor(p.grad.full_tensor(), mesh, [Replicate()])

    def plain_exp_avg():
        kept = opt.state[p]["exp_avg"]
        opt.state[p]["exp_avg"] = kept.full_tensor().clone()
        return lambda: opt.state[p].__setitem__("exp_avg", kept)

    def nan_state_on_rank1():
        kept = opt.state[p]["exp_avg"]
        local = kept.to_local().clone()
        if rank == 1:
            local.fill_(float("nan"))
        opt.state[p]["exp_avg"] = DTensor.from_local(
            local, mesh, p.placements, shape=p.shape, stride=p.stride()
        )
        return lambda: opt.state[p].__setitem__("exp_avg", kept)

    def nan_grad_on_rank1():
        if rank == 1:
            p.grad.to_local().fill_(float("nan"))

    partial = nn.Parameter(DTensor.from_local(torch.ones(2), mesh, [Partial()]))
    try:
        mgg_opt([partial], "reference")
    except ValueError as err:
        errors["partial_param"] = str(err)
    attempt("replicated_grad", replicated_grad)
    attempt("plain_exp_avg", plain_exp_avg)
    attempt("nan_state_on_rank1", nan_state_on_rank1)
    attempt("nan_grad_on_rank1", nan_grad_on_rank1)
    errors["skipped"] = opt.num_skipped_steps
    train(model, opt, range(1, 2), [rank])  # still works after all of the above
    errors["steps"] = [float(opt.state[q]["step"]) for q in model.parameters()]
    return errors


def train_grads(model, rank) -> None:
    for q in model.parameters():
        q.grad = None
    model(batch(rank, 9)).pow(2).mean().backward()


def _dcp_scenario(rank, mesh, out: Path) -> dict:
    """Resume through DCP across world sizes: 2 ranks save at step 2, 1 rank loads and goes on
    to step 4 (and the reverse); and the gathered full state loads into a plain single-process
    optimizer. Each is compared with an uninterrupted 2-rank run."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import DeviceMesh

    def state_of(model, opt):
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}

    def load(model, opt, ckpt, group):
        target = state_of(model, opt)
        dcp.load(target, checkpoint_id=ckpt, process_group=group)
        set_model_state_dict(model, target["model"])
        set_optimizer_state_dict(model, opt, target["optim"])

    result = {}
    solo_group = dist.new_group([0])  # every rank takes part in making it
    for backend in BACKENDS:
        model = sharded(tiny_model(), mesh)
        opt = mgg_opt(list(model.parameters()), backend)
        train(model, opt, range(4), [rank])
        uninterrupted = full_params(model)

        model2 = sharded(tiny_model(), mesh)
        opt2 = mgg_opt(list(model2.parameters()), backend)
        train(model2, opt2, range(2), [rank])
        ckpt2 = str(out / f"dcp2-{backend}")
        dcp.save(state_of(model2, opt2), checkpoint_id=ckpt2)
        full_sd = get_optimizer_state_dict(model2, opt2, options=StateDictOptions(full_state_dict=True))
        full_model = get_model_state_dict(model2, options=StateDictOptions(full_state_dict=True))
        ckpt1 = str(out / f"dcp1-{backend}")
        r = {"uninterrupted": uninterrupted}
        if rank == 0:
            solo = DeviceMesh.from_group(solo_group, "cpu")
            model1 = sharded(tiny_model(), solo)
            opt1 = mgg_opt(list(model1.parameters()), backend)
            load(model1, opt1, ckpt2, solo_group)
            train(model1, opt1, range(2, 4), range(WORLD))
            r["two_to_one"] = full_params(model1)
            # the reverse: one rank trains to step 2 and saves
            model1 = sharded(tiny_model(), solo)
            opt1 = mgg_opt(list(model1.parameters()), backend)
            train(model1, opt1, range(2), range(WORLD))
            dcp.save(state_of(model1, opt1), checkpoint_id=ckpt1, process_group=solo_group)
            # the gathered full state in a plain (not distributed) model and optimizer
            plain = tiny_model()
            plain.load_state_dict(full_model)
            plain_opt = mgg_opt(list(plain.parameters()), backend)
            names = [n for n, _ in plain.named_parameters()]
            plain_opt.load_state_dict(
                {
                    "state": {i: full_sd["state"][n] for i, n in enumerate(names)},
                    "param_groups": [{**full_sd["param_groups"][0], "params": list(range(len(names)))}],
                }
            )
            train(plain, plain_opt, range(2, 4), range(WORLD))
            r["full_to_plain"] = full_params(plain)
        dist.barrier()
        model3 = sharded(tiny_model(), mesh)
        opt3 = mgg_opt(list(model3.parameters()), backend)
        load(model3, opt3, ckpt1, None)
        train(model3, opt3, range(2, 4), [rank])
        r["one_to_two"] = full_params(model3)
        r["steps"] = [float(opt3.state[p]["step"]) for p in model3.parameters()]
        result[backend] = r
    return result


def _worker(rank, world_size, out):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    return {
        "fsdp": _fsdp_scenario(rank, mesh),
        "plain": _plain_dtensor_scenario(rank, mesh),
        "errors": _errors_scenario(rank, mesh),
        "dcp": _dcp_scenario(rank, mesh, out),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_local_processes(_worker, tmp_path_factory.mktemp("dtensor"), nprocs=WORLD)


def assert_params_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], **F32, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_steps_the_shards_as_one_process_steps_the_full_model(results, backend):
    for r in results:
        got = r["fsdp"][backend]
        assert_params_close(got["sharded"], got["single"])
        assert got["sharded"]["0.weight"].ne(tiny_model()[0].weight.detach()).all()  # it moved
        for name, single in got["single_state"].items():
            full = got["full_state"][name]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert_close(full[key], single[key], **F32)
            for key in ("memory_W", "memory_b"):  # [*p.shape, ...] for a DTensor, [numel, ...] plain
                assert_close(full[key].reshape(single[key].shape), single[key], **F32)
        assert got["state_placements_match"] and got["step_is_plain"]
        assert got["memory_W_shape"] == [5, 3, 1, 8, 8]
    # 5 rows split 3 + 2; the 1-row Linear's shard on rank 1 is empty
    assert results[0]["fsdp"][backend]["local_numels"] == [9, 3, 3, 3, 5, 1]
    assert results[1]["fsdp"][backend]["local_numels"] == [6, 2, 2, 2, 0, 0]
    assert [r["fsdp"][backend]["state_local_numel"] for r in results] == [1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_dtensors_step_as_full_tensors(results, backend):
    for r in results:
        got = r["plain"][backend]
        for a, b in zip(got["dtensor"], got["plain"], strict=True):
            assert_close(a, b, **F32)


def test_unsupported_input_raises_on_every_rank_and_changes_nothing(results):
    for rank, r in enumerate(results):
        e = r["errors"]
        assert e["partial_param"].startswith("a DTensor parameter with Partial placements")
        assert e["replicated_grad"].startswith("ValueError: the gradient is laid out as (Replicate(),)")
        assert e["plain_exp_avg"].startswith(
            "TypeError: state of parameter 0 of group 0['exp_avg'] is a plain"
        )
        if rank == 1:
            assert "holds NaN values" in e["nan_state_on_rank1"]
        else:
            assert e["nan_state_on_rank1"].startswith("RuntimeError: another rank rejected")
        assert e["nan_grad_on_rank1"] is None and e["skipped"] == 1  # skipped on both ranks
        for name in ("replicated_grad", "plain_exp_avg", "nan_state_on_rank1", "nan_grad_on_rank1"):
            assert e[name + "/unchanged"], name
        assert e["steps"] == [2.0] * 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcp_resume_across_world_sizes_matches_an_uninterrupted_run(results, backend):
    for r in results:
        got = r["dcp"][backend]
        assert_params_close(got["one_to_two"], got["uninterrupted"])
        assert got["steps"] == [4.0] * 6
    solo = results[0]["dcp"][backend]
    assert_params_close(solo["two_to_one"], solo["uninterrupted"])
    assert_params_close(solo["full_to_plain"], solo["uninterrupted"])
