"""The fine-tuning job in process: checkpoints and resume, other meshes, NaN stop, config errors,
export to Hugging Face."""

import json
import pathlib
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxgist.core import config as config_lib
from jaxgist.main import run_job
from jaxgist.methods import finetune, finetune_step
from jaxgist.training import checkpoint, metrics, optim, parallel

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import finetune as finetune_config  # noqa: E402


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """One generated dataset shared by the module's runs."""
    return str(tmp_path_factory.mktemp("synthetic") / "birds")


def small(synthetic_dir, **train_overrides):
    c = finetune_config.get_config("small")
    c.data.synthetic.dir = synthetic_dir
    c.train.update(train_overrides)
    return c


def saved_state(workdir, step):
    """The checkpointed train state of ``step`` as numpy arrays."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def flat(tree):
    return {optim.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def test_a_rerun_of_a_finished_job_keeps_its_results(tmp_path, synthetic_dir):
    c = small(synthetic_dir, steps=2, save_every=2, eval_every=2)
    first = run_job(c, str(tmp_path))["finetune"]
    written = (tmp_path / "results.json").read_text()
    again = run_job(c, str(tmp_path))["finetune"]
    assert (tmp_path / "results.json").read_text() == written  # nothing rewritten, no NaN loss, no 0 img/s
    assert again["final_loss"] == first["final_loss"] and again["images_per_s"] == first["images_per_s"]
    json.loads(written, parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))


# ---------------------------------------------------------------------------------------------
# In-process runs (8 fake CPU devices)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_on_another_mesh_and_export_to_hugging_face(tmp_path, synthetic_dir):
    transformers = pytest.importorskip("transformers")
    c = small(synthetic_dir, steps=4, save_every=4, eval_every=0, export_hf=True)
    c.mesh = (("data", -1),)
    first = run_job(c, str(tmp_path))["finetune"]
    assert first["steps"] == 4 and np.isfinite(first["final_loss"])
    saved = saved_state(tmp_path, 4)

    # The same state restored onto a 4x2 data/fsdp mesh: same values, sharded over fsdp.
    c2 = small(synthetic_dir, steps=6, save_every=2, eval_every=0)
    c2.mesh = (("data", 4), ("fsdp", 2))
    mesh = parallel.make_mesh(c2.mesh)
    setup = finetune_step.build(c2, mesh, 6, model_cfg=finetune.clip.config_from_model_config(c2.model))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    state = ckpt.restore_state_only(4, setup.abstract_state.as_dict())
    ckpt.close()
    fc1 = state["models"]["clip"]["vision_model"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert_trees_equal(jax.device_get(state["models"]["clip"]), saved["models"]["clip"])

    # Running on with the new mesh resumes at step 4.
    second = run_job(c2, str(tmp_path))["finetune"]
    assert second["start_step"] == 4 and second["steps"] == 6

    # export_hf wrote the step-4 parameters where transformers can load them.
    hf = transformers.CLIPModel.from_pretrained(first["export_hf"])
    ours = flat(saved["models"]["clip"])["vision_model.encoder.layers.0.mlp.fc1.kernel"]
    np.testing.assert_allclose(hf.vision_model.encoder.layers[0].mlp.fc1.weight.detach().numpy(),
                               np.asarray(ours).T, atol=0)
    # and export_hf of any saved step works after the fact
    out = checkpoint.export_hf(tmp_path, c2.model, tmp_path / "hf6", step=6)
    assert (out / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="step 5 is not saved"):
        checkpoint.export_hf(tmp_path, c2.model, tmp_path / "hf5", step=5)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_dir):
    c = small(synthetic_dir, steps=6, save_every=1, eval_every=0)
    c.optim.lr = 1e30  # the first update blows the parameters up; the second loss is not finite
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2; stopping\. Last good checkpoint: step 1"):
        run_job(c, str(tmp_path))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_evaluation_and_best_checkpoint(tmp_path, synthetic_dir):
    c = small(synthetic_dir, steps=6, save_every=2, eval_every=2, keep=1, best_metric="zero_shot_top1")
    out = run_job(c, str(tmp_path))["finetune"]
    assert 0.0 <= out["val_zero_shot_top1"] <= 1.0 and out["val_images"] == 16
    logged = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    evals = [r for r in logged if "val/zero_shot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert [r["step"] for r in logged if "train/loss" in r] == [2, 4, 6]
    assert all(r["train/images_per_s"] > 0 for r in logged if "train/loss" in r)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
def test_evaluate_and_watch_modes_score_saved_checkpoints(tmp_path, synthetic_dir):
    """mode=evaluate scores one saved step with the weights training evaluated (same figure); mode=watch
    scores every saved step and stops once the last step is done; both add to results.json."""
    c = small(synthetic_dir, steps=6, save_every=2, eval_every=3, keep=1, best_metric="zero_shot_top1")
    trained = run_job(c, str(tmp_path))["finetune"]
    logged = {r["step"]: r["val/zero_shot_top1"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")
              if "val/zero_shot_top1" in r}
    assert sorted(logged) == [3, 6]
    ckpt = finetune.checkpointer(c, tmp_path)
    saved, best = ckpt.all_steps(), ckpt.best_step()
    ckpt.close()
    assert best in (3, 6) and saved == sorted({best, 6})  # step 4 (not evaluated) is never the best

    in_flight = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234"  # another job's save being written
    in_flight.mkdir()
    c.mode = "evaluate"
    c.evaluate.step = 3 if 3 in saved else -1
    step = c.evaluate.step if c.evaluate.step > 0 else 6
    out = run_job(c, str(tmp_path))["finetune"]
    assert list(out) == [f"step_{step}"]
    assert out[f"step_{step}"]["zero_shot"]["val_top1"] == pytest.approx(logged[step], abs=1e-9)
    c.evaluate.step = 5
    with pytest.raises(FileNotFoundError, match=r"step 5 is not saved .*saved steps: \["):
        run_job(c, str(tmp_path))

    c.mode = "watch"
    c.evaluate.update(dict(step=-1, watch_interval_s=0.1, watch_timeout_s=5.0))
    watched = run_job(c, str(tmp_path))["finetune"]
    assert sorted(watched) == [f"step_{s}" for s in saved]
    for name, heads in watched.items():
        assert heads["zero_shot"]["val_top1"] == pytest.approx(logged[int(name[5:])], abs=1e-9)
        assert heads["zero_shot"]["val_images"] == 16
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["run"]["finetune"]["final_loss"] == trained["final_loss"]  # the training figures are kept
    assert sorted(written["finetune"]) == [f"step_{s}" for s in saved]
    assert (tmp_path / "eval" / "metrics.jsonl").exists()
    assert in_flight.is_dir()  # evaluation only reads: it never cleans up a save in flight


def test_watch_without_checkpoints_stops_after_the_timeout(tmp_path, synthetic_dir):
    c = small(synthetic_dir, steps=4)
    c.mode = "watch"
    c.evaluate.update(dict(watch_interval_s=0.1, watch_timeout_s=0.5))
    t0 = time.perf_counter()
    assert run_job(c, str(tmp_path))["finetune"] == {}
    assert time.perf_counter() - t0 < 60


def test_checkpointer_keeps_the_latest_and_the_best(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2, best_metric="acc", async_save=False)
    for step, acc in enumerate([0.1, 0.9, 0.2, 0.3, 0.4], start=1):
        ckpt.save(step, {"w": np.full(3, step, np.float32)}, metrics={"acc": acc})
    assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
    restored = ckpt.restore_state_only(2, {"w": jax.ShapeDtypeStruct((3,), np.float32)})
    np.testing.assert_array_equal(restored["w"], [2, 2, 2])
    with pytest.raises(KeyError, match="best_metric 'acc'"):
        ckpt.save(6, {"w": np.zeros(3, np.float32)}, metrics={"loss": 1.0})
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda c: c.train.__setattr__("epoch", 3), r"config\.train\.epoch is not a known key \(did you mean train\.epochs\?\)"),
    (lambda c: c.optim.__setattr__("learning_rate", 1e-3), r"config\.optim\.learning_rate is not a known key"),
    (lambda c: c.train.__setattr__("global_batch", 0), r"config\.train\.global_batch=0 must be >= 1"),
    (lambda c: c.optim.__setattr__("name", "adamax"), r"config\.optim\.name='adamax'"),
    (lambda c: c.data.__setattr__("source", "csv"), r"config\.data\.source='csv'"),
    (lambda c: c.__setattr__("mesh", (("data", 3),)), r"mesh \{'data': 3\} has 3 devices, but 8"),
    (lambda c: c.train.__setattr__("best_metric", "zero_shot_top1") or c.train.__setattr__("eval_every", 0),
     r"config\.train\.best_metric='zero_shot_top1' needs evaluation"),
    (lambda c: c.train.__setattr__("global_batch", 12), r"global_batch=12 is not divisible by the 8"),
    (lambda c: c.__setattr__("mode", "eval"), r"config\.mode='eval' is not one of"),
    (lambda c: c.evaluate.__setattr__("watch_timeout_s", 0.0), r"watch_timeout_s must be > 0"),
    (lambda c: c.data.__setattr__("train_split", "test"), r"the test split is never trained or selected on"),
])
def test_bad_configs_fail_at_start_naming_the_key(tmp_path, synthetic_dir, edit, match):
    c = small(synthetic_dir)
    with c.unlocked():
        edit(c)
    with pytest.raises(config_lib.ConfigError, match=match):
        run_job(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_gist_source_needs_existing_files(tmp_path):
    c = finetune_config.get_config("")
    c.data.metadata = str(tmp_path / "missing.csv")
    c.data.image_dir = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.metadata=.*missing\.csv.*no such file"):
        finetune.validate(c)
