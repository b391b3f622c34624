"""GIST stages: embeddings from an Orbax checkpoint, config checks, bad input."""

import jax
import ml_collections
import numpy as np
import pytest

from jaxgist.training import checkpoint
from jaxgist.core import config as config_lib
from jaxgist.evaluation import embeddings
from jaxgist.methods import gist
from jaxgist.training import optim
from jaxgist.training import parallel
from jaxgist.training import train_state as train
from jaxgist.data import sources, synthetic
from jaxgist.models import clip

TINY = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
            text=dict(context_length=77, width=32, layers=1, heads=2, mlp_dim=64), embed_dim=16)


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("birds") / "d", num_classes=4, train_per_class=3,
                                   val_per_class=1, test_per_class=1, image_size=40, shots=(1,))


def test_embeddings_from_an_orbax_checkpoint_equal_the_in_memory_model(tmp_path, birds):
    c = ml_collections.ConfigDict(dict(model=dict(init="", preset=TINY, dtype="float32"),
                                       optim=optim.default_config(), sharding=dict(rules=parallel.DEFAULT_RULES)))
    c.optim.lr = 1e-3
    mesh = parallel.make_mesh((("data", 4), ("fsdp", 2)))
    model = clip.from_config(c.model, seed=0)
    setup = train.build(c, mesh, 2, model_cfg=model.config)
    state = setup.init_state(model)
    rng = np.random.default_rng(0)
    sharding = parallel.batch_sharding(mesh)
    for _ in range(2):  # move the weights away from the initialization
        batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                 "ids": np.tile(np.r_[49406, 320, 1929, 49407, np.zeros(73, int)].astype(np.int32), (8, 1))}
        state, _ = setup.step(state, {k: jax.device_put(v, sharding) for k, v in batch.items()})
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(2, state.as_dict(), force=True)
    ckpt.close()

    source = sources.GistSource(birds.metadata, birds.image_dir, split="test")
    in_memory = embeddings.encode_source(setup.model(state), source, batch_size=3)
    restored, step = checkpoint.load_model(tmp_path, c.model)
    assert step == 2
    from_ckpt = embeddings.encode_source(restored, source, batch_size=3)
    np.testing.assert_array_equal(from_ckpt["y"], in_memory["y"])
    np.testing.assert_allclose(from_ckpt["x"], in_memory["x"], atol=1e-6, rtol=0)
    fresh = embeddings.encode_source(clip.from_config(c.model, seed=0), source, batch_size=3)
    assert not np.allclose(fresh["x"], in_memory["x"], atol=1e-3)  # the checkpoint is not the init


def test_missing_checkpoints_are_clear_errors(tmp_path):
    model_cfg = ml_collections.ConfigDict(dict(init="", preset=TINY, dtype="float32"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nowhere", model_cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        checkpoint.load_model(tmp_path / "empty", model_cfg)


def test_embeddings_file_round_trip(tmp_path):
    splits = {"train": {"x": np.ones((3, 4), np.float32), "y": np.arange(3, dtype=np.int32),
                        "index": np.arange(3)},
              "val_extra": {"x": np.zeros((1, 4), np.float32), "y": np.zeros(1, np.int32), "index": np.zeros(1)}}
    embeddings.save(tmp_path / "e.npz", splits, ["a", "b", "c"])
    loaded, names = embeddings.load(tmp_path / "e.npz")
    assert names == ["a", "b", "c"] and set(loaded) == {"train", "val_extra"}
    np.testing.assert_array_equal(loaded["train"]["y"], [0, 1, 2])


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.gist.__setattr__("stages", ("match", "polish")), r"unknown stage\(s\) \['polish'\]"),
    (lambda c: c.gist.__setattr__("stages", ("finetune", "match")), r"must keep the order"),
    (lambda c: c.gist.__setattr__("probes", ("svm",)), r"unknown probe\(s\) \['svm'\]"),
    (lambda c: c.gist.__setattr__("match_k", 3), r"num_captions=5 exceeds config\.gist\.match_k=3"),
    (lambda c: c.gist.__setattr__("probe_lr", 0.1), r"config\.gist\.probe_lr is not a known key"),
])
def test_bad_gist_configs_are_named(edit, match):
    c = gist.default_config()
    c.data.source = "synthetic"
    with c.unlocked():
        edit(c)
    with pytest.raises(config_lib.ConfigError, match=match):
        gist.validate(c)


def test_comparison_table_rows():
    res = {"linear_probe_sgd/finetuned": {"test_top1": 0.5, "test_top3": 0.75, "test_top1_bootstrap_std": 0.01,
                                          "val_top1": 0.4},
           "zero_shot/pretrained": {"test_top1": 0.25}, "finetune": {"steps": 3}}
    table = gist.comparison_table(res)
    assert "| linear_probe_sgd | finetuned | 50.0 ± 1.0 | 75.0 | 40.0 |" in table
    assert "| zero_shot | pretrained | 25.0 | - | - |" in table
    assert len(table.strip().splitlines()) == 4  # header, rule, two heads: "finetune" is not a head
