"""GIST stages: embeddings from an Orbax checkpoint, config checks, bad input."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from jaxgist.core import config as config_lib
from jaxgist.core import results
from jaxgist.data import sources, synthetic
from jaxgist.evaluation import embeddings
from jaxgist.methods import finetune_step, gist
from jaxgist.models import clip
from jaxgist.training import checkpoint, optim, parallel

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
    setup = finetune_step.build(c, mesh, 2, model_cfg=model.config)
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
    # the fine-tuning stage's values fail before matching runs, not after
    (lambda c: c.optim.__setattr__("name", "lamb"), r"config\.optim\.name='lamb' is not one of"),
    (lambda c: c.__setattr__("mesh", (("data", 3),)), r"mesh .* has 3 devices, but 8 are available"),
    (lambda c: c.train.__setattr__("save_every", 0), r"config\.train\.save_every=0 must be >= 1"),
    (lambda c: c.pretrain.__setattr__("lr", -1.0), r"the pretrain stage .*config\.optim\.lr=-1\.0 must be > 0"),
    (lambda c: c.data.__setattr__("workers", -1), r"config\.data\.workers must be >= 0"),
    (lambda c: c.__setattr__("mode", "watch"), r"config\.mode='watch': GIST runs its stages"),
])
def test_bad_gist_configs_are_named(edit, match):
    c = gist.default_config()
    c.data.source = "synthetic"
    c.gist.stages = ("pretrain", "match", "finetune", "embed", "evaluate")
    c.model.preset = "ViT-B/32"
    with c.unlocked():
        edit(c)
    with pytest.raises(config_lib.ConfigError, match=match):
        gist.validate(c)


def test_comparison_table_rows():
    table = {"finetuned": {"linear_probe_sgd": {"test_top1": 0.5, "test_top3": 0.75, "test_top1_bootstrap_std": 0.01,
                                                "val_top1": 0.4, "epoch": 12}},
             "pretrained": {"zero_shot": {"test_top1": 0.25}}}
    out = results.comparison_table(table)
    assert "| linear_probe_sgd | finetuned | 50.0 ± 1.0 | 75.0 | 40.0 |" in out
    assert "| zero_shot | pretrained | 25.0 | - | - |" in out
    assert len(out.strip().splitlines()) == 4  # header, rule, one row per (head, model)


def test_results_schema_is_checked_and_merged(tmp_path):
    results.write(tmp_path, "gist", {"pretrained": {"zero_shot": {"test_top1": 0.25}}}, run={"stages": {"a": 1}})
    merged = results.write(tmp_path, "gist", {"finetuned": {"zero_shot": {"test_top1": 0.5}}},
                           run={"stages": {"b": 2}})
    assert merged["gist"] == {"pretrained": {"zero_shot": {"test_top1": 0.25}},
                              "finetuned": {"zero_shot": {"test_top1": 0.5}}}
    assert merged["run"]["gist"]["stages"] == {"a": 1, "b": 2}
    assert json.loads((tmp_path / "results.json").read_text()) == merged
    md = (tmp_path / "results.md").read_text()
    assert "| zero_shot | pretrained | 25.0 |" in md and "| zero_shot | finetuned | 50.0 |" in md
    for bad, match in [({"m": {"h": {"top1": [1, 2]}}}, r"\['m'\]\['h'\]\['top1'\] = \[1, 2\] is not a number"),
                       ({"m": {"h": 0.5}}, r"\['m'\]\['h'\] must map metric names"),
                       ({"m": 0.5}, r"\['m'\] must map heads")]:
        with pytest.raises(results.ResultsError, match=match):
            results.write(tmp_path, "gist", bad)
    assert json.loads((tmp_path / "results.json").read_text()) == merged  # a refused write changes nothing


@pytest.mark.parametrize("match_k", [5, 10])
def test_later_stages_read_the_captions_of_match_k(tmp_path, monkeypatch, match_k):
    """captions_top5.json sorts after captions_top10.json: the file is named by gist.match_k, not found
    by sorting."""
    for k in (5, 10):
        (tmp_path / "match").mkdir(exist_ok=True)
        (tmp_path / "match" / f"captions_top{k}.json").write_text("{}")
    c = gist.default_config()
    c.data.source = "synthetic"
    c.gist.stages = ("finetune",)
    c.gist.match_k = match_k
    c.model.init = "ViT-B/32"
    seen = []
    monkeypatch.setattr(gist, "finetune_stage", lambda config, workdir, init, captions: seen.append(captions) or {})
    gist.run(c, str(tmp_path))
    assert seen == [str(tmp_path / "match" / f"captions_top{match_k}.json")]


@pytest.mark.parametrize("fault", ["missing_test_image", "unknown_split"])
def test_every_split_is_checked_before_the_first_expensive_stage(tmp_path, monkeypatch, fault):
    """A missing test image or a wrong split name fails at start, not in the embed stage after
    matching and fine-tuning."""
    import os

    from jaxgist.data import datasets, sources

    c = gist.default_config()
    c.data.source = "synthetic"
    c.data.synthetic.update(dict(num_classes=3, train_per_class=2, val_per_class=1, test_per_class=1,
                                 image_size=32, shots=(), dir=str(tmp_path / "birds")))
    c.model.init = "ViT-B/32"
    paths = datasets.paths(c.data, tmp_path)
    c.data.update(dict(source="gist", metadata=paths["metadata"], image_dir=paths["image_dir"],
                       descriptions=paths["descriptions"]))
    if fault == "missing_test_image":
        test_file = next(r["path"] for r in sources.GistSource(paths["metadata"], paths["image_dir"], split="test"))
        os.remove(test_file)
        match = rf"1 of 3 image file\(s\) do not exist, e\.g\. .*{os.path.basename(test_file)}"
    else:
        c.gist.splits = ("train", "val", "test", "vall")
        match = r"split\(s\) \['vall'\] have no rows"
    monkeypatch.setattr(gist.caption_matching, "match_split", lambda *a, **k: pytest.fail("matching started"))
    with pytest.raises((FileNotFoundError, sources.DataError), match=match):
        gist.run(c, str(tmp_path / "work"))
