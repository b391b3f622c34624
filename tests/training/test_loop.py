"""The model-agnostic training core on a toy pair of models: a trained student with BatchNorm and a
frozen teacher in one TrainState, optimizer state placed like its parameter (by shape), checkpoints of
the whole state, and the loop's evaluation, best-metric, resume and non-finite bookkeeping."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgist.training import checkpoint, loop, metrics, parallel, train_state


class Student(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.dense(x))))


class Teacher(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def axes(path):
    """Logical axes of the toy models' variables: kernels' output width is 'embed'."""
    name = [k for k in path if k != "value"][-1]
    return (None, "embed") if name == "kernel" else (None,)


def make_layout(mesh, tx=None):
    abstract = {"student": nnx.eval_shape(lambda: Student(nnx.Rngs(0))),
                "teacher": nnx.eval_shape(lambda: Teacher(nnx.Rngs(1)))}
    return train_state.layout(abstract, {"student": tx or optax.adam(1e-2)}, mesh, (("embed", "fsdp"),),
                              {"student": axes, "teacher": axes})


def make_step(layout):
    def loss_fn(params, rest, teacher, x):
        student = layout.module("student", params, rest)
        student.train()
        loss = jnp.mean((student(x) - teacher(x)) ** 2)
        return loss, nnx.state(student, nnx.Not(nnx.Param))

    @jax.jit
    def step(state, batch):
        params, rest = layout.split(state, "student")
        teacher = layout.merge(state, "teacher")
        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, teacher, batch["x"])
        return layout.apply_gradients(state, {"student": grads}, rest={"student": new_rest}), {"loss": loss}

    return step


def batches(n=64, batch=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    ds = grain.MapDataset.source([{"x": row} for row in x]).repeat().batch(batch)
    return iter(ds)


def fresh_state(layout):
    return layout.init({"student": Student(nnx.Rngs(0)), "teacher": Teacher(nnx.Rngs(1))})


def test_two_models_batch_statistics_and_a_frozen_teacher():
    mesh = parallel.make_mesh((("data", 4), ("fsdp", 2)))
    layout = make_layout(mesh)
    state = fresh_state(layout)
    assert sorted(state.models) == ["student", "teacher"] and sorted(state.opt_states) == ["student"]
    # the width of each kernel is split over fsdp, optimizer moments alike
    kernel = state.models["student"]["dense"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    mu = state.opt_states["student"][0].mu["dense"]["kernel"][...]
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    teacher_before = jax.device_get(state.models["teacher"])
    mean_before = np.asarray(state.models["student"]["bn"]["mean"][...])
    kernel_before = np.asarray(kernel)
    step = make_step(layout)
    it = batches()
    for _ in range(3):
        state, m = step(state, {"x": next(it)["x"]})
    assert int(state.step) == 3 and np.isfinite(float(m["loss"]))
    # BatchNorm's running statistics are kept and updated, not dropped with the non-parameters
    assert not np.allclose(np.asarray(state.models["student"]["bn"]["mean"][...]), mean_before)
    assert not np.allclose(np.asarray(state.models["student"]["dense"]["kernel"][...]), kernel_before)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.models["teacher"]), teacher_before)
    with pytest.raises(ValueError, match="name one"):
        _ = state.params
    with pytest.raises(ValueError, match="no optimizer"):
        layout.apply_gradients(state, {"teacher": nnx.filter_state(state.models["teacher"], nnx.Param)})


def test_optimizer_state_follows_a_parameter_only_with_its_shape():
    """A leaf with a parameter's path and rank but another shape (a per-row statistic) is replicated."""

    def init(params):
        return {"row": jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape[:-1] + (1,), p.dtype), params),
                "moment": jax.tree_util.tree_map(jnp.zeros_like, params)}

    tx = optax.GradientTransformation(init, lambda g, s, p=None: (g, s))
    mesh = parallel.make_mesh((("data", 4), ("fsdp", 2)))
    layout = make_layout(mesh, tx)
    opt = layout.shardings.opt_states["student"]
    assert opt["moment"]["dense"]["kernel"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert opt["row"]["dense"]["kernel"].get_value().spec == jax.sharding.PartitionSpec()
    state = fresh_state(layout)  # places (4, 1) rows without trying to split 1 column over 2 devices
    assert state.opt_states["student"]["row"]["dense"]["kernel"][...].shape == (4, 1)


def run_loop(tmp_path, total, *, eval_every=0, save_every=2, keep=3, best_metric=None, evaluate=None, mesh=None,
             step_wrapper=None):
    mesh = mesh or parallel.make_mesh((("data", -1),))
    layout = make_layout(mesh)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=save_every, keep=keep,
                                   best_metric=best_metric, async_save=False)
    it = batches()
    state, start = loop.restore_or_init(ckpt, layout.abstract, lambda: fresh_state(layout), it)
    step = make_step(layout)
    logger = metrics.MetricsLogger(tmp_path, total_steps=total, global_batch=8, log_every=1)
    try:
        result = loop.run(state, step_wrapper(step) if step_wrapper else step, it, to_device=lambda b: b,
                          checkpointer=ckpt, logger=logger, total_steps=total, start_step=start,
                          eval_every=eval_every, evaluate=evaluate)
        return result, ckpt.all_steps(), ckpt.best_step(), {s: ckpt.manager.metrics(s) for s in ckpt.all_steps()}
    finally:
        logger.close()
        ckpt.close()


def test_a_checkpoint_carries_the_metrics_of_its_own_step_only(tmp_path):
    """eval every 3, save every 2: step 4 is saved without evaluation and must not inherit step 3's
    score (it would then tie with step 3 and be kept as the 'best')."""
    result, steps, best, saved_metrics = run_loop(
        tmp_path, 6, eval_every=3, save_every=2, keep=1, best_metric="score",
        evaluate=lambda state: {"score": 10.0 - float(state.step)})
    assert result.last_eval_step == 6 and result.last_eval == {"score": 4.0}
    assert best == 3 and steps == [3, 6], (best, steps, saved_metrics)
    assert saved_metrics[3] == {"score": 7.0}


def test_resume_continues_exactly(tmp_path):
    whole, _, _, _ = run_loop(tmp_path / "whole", 6)
    run_loop(tmp_path / "split", 4)
    resumed, steps, _, _ = run_loop(tmp_path / "split", 6)
    assert resumed.start_step == 4 and steps[-1] == 6
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed.state.as_dict()),
                           jax.device_get(whole.state.as_dict()))
    # the whole state, batch statistics and the frozen teacher included, restores onto another mesh
    layout = make_layout(parallel.make_mesh((("data", 4), ("fsdp", 2))))
    ckpt = checkpoint.Checkpointer(tmp_path / "split" / "checkpoints", async_save=False)
    restored = ckpt.restore_state_only(6, layout.abstract.as_dict())
    models = ckpt.restore_models(6, {"student": layout.abstract.models["student"]})
    ckpt.close()
    assert restored["models"]["student"]["dense"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_array_equal(np.asarray(models["student"]["bn"]["var"][...]),
                                  np.asarray(whole.state.models["student"]["bn"]["var"][...]))


def test_non_finite_loss_stops_before_saving_that_step(tmp_path):
    def poisoned(step):
        def wrapped(state, batch):
            state, m = step(state, batch)
            return state, {"loss": jnp.where(state.step >= 3, jnp.nan, m["loss"])}
        return wrapped

    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*Last good checkpoint: step 2"):
        run_loop(tmp_path, 6, save_every=2, step_wrapper=poisoned)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_an_ema_copy_rides_in_the_state_and_is_checkpointed(tmp_path):
    """A third model without an optimizer, set each step to an exponential moving average of the student."""
    mesh = parallel.make_mesh((("data", -1),))
    abstract = {name: nnx.eval_shape(lambda: Student(nnx.Rngs(0))) for name in ("student", "ema")}
    layout = train_state.layout(abstract, {"student": optax.sgd(0.1)}, mesh, (), {"student": axes, "ema": axes})
    state = layout.init({"student": Student(nnx.Rngs(0)), "ema": Student(nnx.Rngs(0))})

    @jax.jit
    def step(state, x):
        params, rest = layout.split(state, "student")

        def loss_fn(params):
            student = layout.module("student", params, rest)
            return jnp.mean(student(x) ** 2), nnx.state(student, nnx.Not(nnx.Param))

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new = layout.apply_gradients(state, {"student": grads}, rest={"student": new_rest})
        ema = jax.tree_util.tree_map(lambda e, s: 0.5 * e + 0.5 * s, state.models["ema"], new.models["student"])
        return new.replace(models={**new.models, "ema": ema})

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    s0 = jax.device_get(state.models["student"]["dense"]["kernel"][...])
    state = step(state, x)
    s1 = jax.device_get(state.models["student"]["dense"]["kernel"][...])
    ema = jax.device_get(state.models["ema"]["dense"]["kernel"][...])
    np.testing.assert_allclose(ema, 0.5 * s0 + 0.5 * s1, rtol=1e-6)
    assert int(state.step) == 1 and not np.allclose(s0, s1) and sorted(state.opt_states) == ["student"]
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state.as_dict(), force=True)
    restored = ckpt.restore_models(1, {"ema": layout.abstract.models["ema"]})
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(restored["ema"]["dense"]["kernel"][...]), ema)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_metadata"])
def test_a_damaged_newest_step_is_named_moved_aside_and_the_one_before_resumes(tmp_path, damage, caplog):
    import os

    whole, _, _, _ = run_loop(tmp_path / "whole", 4)
    run_loop(tmp_path / "run", 4, save_every=2)  # steps 2 and 4, each with its checksums
    step4 = tmp_path / "run" / "checkpoints" / "4"
    assert (step4 / checkpoint.CHECKSUMS).exists()
    data = max((p for p in (step4 / "state").rglob("*") if p.is_file() and p.name != "_METADATA"),
               key=lambda p: p.stat().st_size)
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        for i in range(0, 64):
            raw[len(raw) // 2 + i] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        os.remove(step4 / "state" / "_METADATA")
    with caplog.at_level("WARNING"):
        resumed, steps, _, _ = run_loop(tmp_path / "run", 4, save_every=2)
    assert resumed.start_step == 2 and steps == [2, 4]  # resumed from step 2, then step 4 saved anew
    assert any("checkpoint step 4" in r.getMessage() and "is damaged" in r.getMessage() for r in caplog.records)
    aside = list((tmp_path / "run" / "checkpoints.damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("4-")  # kept, not deleted
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed.state.as_dict()),
                           jax.device_get(whole.state.as_dict()))


def test_a_failed_background_save_stops_the_run_at_once(tmp_path, monkeypatch):
    """The save of step 10 fails in Orbax's background thread: the run stops a step or two later with
    that error, not at the next save (step 20)."""
    import time

    from orbax.checkpoint._src.checkpointers import async_checkpointer

    def fail(*args, **kwargs):
        raise OSError("No space left on device (injected)")

    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", fail)
    layout = make_layout(parallel.make_mesh((("data", -1),)))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=10)
    it = batches()
    state, _ = loop.restore_or_init(ckpt, layout.abstract, lambda: fresh_state(layout), it)
    step, ran = make_step(layout), []

    def slow_step(state, batch):
        ran.append(1)
        time.sleep(0.05)
        return step(state, batch)

    logger = metrics.MetricsLogger(tmp_path, total_steps=30, global_batch=8, log_every=1)
    try:
        with pytest.raises(checkpoint.SaveFailed, match=r"saving a checkpoint to .*checkpoints failed: OSError: "
                                                        r"No space left on device \(injected\)"):
            loop.run(state, slow_step, it, to_device=lambda b: b, checkpointer=ckpt, logger=logger, total_steps=30)
    finally:
        logger.close()
    assert 10 < len(ran) < 20, len(ran)
