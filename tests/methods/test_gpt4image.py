"""The GPT4Image job: description embeddings (keyed by image name, resumable, equal to OpenAI's
encode_text), training with per-epoch evaluation on the test split and minival, checkpoint evaluation,
the text-loss / baseline comparison, and bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxgist.core import config as config_lib
from jaxgist.data import embedding_store, minival, sources
from jaxgist.evaluation import text_embeddings
from jaxgist.methods import gpt4image
from jaxgist.models import clip
from jaxgist.models.clip import tokenizer as tokenizer_lib

from configs import gpt4image as gpt4image_config  # noqa: E402


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("g4i_synthetic"))


def runlocal(synthetic_dir, **edits):
    c = gpt4image_config.get_config("runlocal")
    c.data.synthetic.dir = synthetic_dir
    c.train.epochs = 2
    for key, value in edits.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.mark.slow
def test_training_writes_final_and_minival_chosen_epochs_and_evaluate_agrees(tmp_path, synthetic_dir):
    c = runlocal(synthetic_dir, gpt4image__ema_decay=0.5)
    out = gpt4image.run(c, str(tmp_path))["gpt4image"]
    table = json.loads((tmp_path / "results.json").read_text())["gpt4image"]["resnet50"]
    assert set(table) == {"raw_final", "raw_minival_chosen", "ema_final", "ema_minival_chosen"}
    run = out["run"]
    assert run["train_images"] + run["minival_images"] == 8 * 24 and run["minival_images"] == 8 * 3
    assert table["raw_final"]["epoch"] == 2.0
    for row in table.values():
        assert 0.0 <= row["test_top1"] <= row["test_top5"] <= 1.0
    # the evaluate mode scores the saved final step exactly as training's last evaluation did
    c.mode = "evaluate"
    evaluated = gpt4image.run(c, str(tmp_path))["gpt4image"]["resnet50"]
    step = run["steps"]
    for head in ("raw", "ema"):
        for metric in ("test_top1", "test_top5", "minival_top1"):
            assert evaluated[f"{head}_step_{step}"][metric] == table[f"{head}_final"][metric]
    # a rerun of the finished job trains nothing and keeps the results
    c.mode = "train"
    again = gpt4image.run(c, str(tmp_path))["gpt4image"]
    assert again["run"]["start_step"] == step and again["resnet50"] == out["resnet50"]


def test_minival_depends_on_names_only():
    names = [f"c{i % 3}/img_{i}.jpg" for i in range(60)]
    labels = np.asarray([i % 3 for i in range(60)])
    held = minival.held_out(names, labels, 0.1)
    order = np.random.default_rng(0).permutation(60)
    held_shuffled = minival.held_out([names[i] for i in order], labels[order], 0.1)
    assert {names[i] for i in np.flatnonzero(held)} == {names[order[i]] for i in np.flatnonzero(held_shuffled)}
    assert held.sum() == 6 and all(held[labels == c].sum() == 2 for c in range(3))
    # a class of one image keeps it for training
    assert not minival.held_out(["a"], [0], 0.5).any()


_TINY = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
             text=dict(context_length=77, width=32, layers=2, heads=2, mlp_dim=64), embed_dim=16)


@pytest.mark.slow
def test_store_is_keyed_by_name_and_resumes_from_its_parts(tmp_path, shared_data):
    model = clip.create(clip.resolve_config(_TINY), seed=3)
    tokenize = tokenizer_lib.load(str(shared_data / "clip_tokenizer"))
    texts = {f"class_{i % 4}/img_{i:03d}.jpg": f"a photo of bird number {i} " + "very " * (i % 30) + "small"
             for i in range(50)}
    directory = tmp_path / "store"
    first = text_embeddings.build_store(model, tokenize, texts, directory, part_size=16, batch_size=8, model_id="t")
    assert first["parts"] == 4 and first["parts_encoded"] == 4 and first["dim"] == 16
    store = embedding_store.EmbeddingStore(directory)
    vectors = {k: store.vector(k) for k in texts}
    # one part lost: a rerun encodes that part only and rebuilds the same store
    os.remove(directory / "parts" / "part-00002.npy")
    second = text_embeddings.build_store(model, tokenize, texts, directory, part_size=16, batch_size=8, model_id="t")
    assert second["parts_encoded"] == 1
    again = embedding_store.EmbeddingStore(directory)
    assert all(np.array_equal(again.vector(k), vectors[k]) for k in texts)
    # other texts make every old part stale
    changed = dict(texts, **{"class_0/img_000.jpg": "another description"})
    third = text_embeddings.build_store(model, tokenize, changed, directory, part_size=16, batch_size=8, model_id="t")
    assert third["parts_encoded"] == 4
    # each vector is its own text's, whatever the batch it was encoded in
    alone = text_embeddings.encode(model, tokenize, [texts["class_1/img_013.jpg"]], batch_size=8)[0]
    np.testing.assert_allclose(vectors["class_1/img_013.jpg"], alone, atol=1e-5)

    class Source:  # records in another order than the store's rows
        class_names = ["class_0", "class_1", "class_2", "class_3"]
        _records = [{"filename": k, "label": int(k[6]), "index": i} for i, k in enumerate(sorted(texts, reverse=True))]

        def __len__(self):
            return len(self._records)

        def __getitem__(self, i):
            return dict(self._records[i])

        filenames = property(lambda self: [r["filename"] for r in self._records])
        labels = property(lambda self: np.asarray([r["label"] for r in self._records]))

    src = embedding_store.WithEmbeddings(Source(), store)
    for i in range(len(src)):
        record = src[i]
        np.testing.assert_array_equal(record["text_embedding"], vectors[record["filename"]])
    with pytest.raises(embedding_store.EmbeddingStoreError, match="gives 32-d"):
        embedding_store.WithEmbeddings(Source(), store, dim=32)


def test_trimmed_batches_equal_openai_encode_text_at_77_tokens(tmp_path, shared_data):
    torch = pytest.importorskip("torch")
    from tests.models.test_clip_resnet import reference

    ref = reference((24, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 2), seed=2)  # heads = width // 64
    torch.save(ref.state_dict(), tmp_path / "rn.pt")
    ours = clip.load(tmp_path / "rn.pt", act="quick_gelu")
    tokenize = tokenizer_lib.load(str(shared_data / "clip_tokenizer"))
    texts = ["a bird.", "a small bird with a red crown " * 12, "x", "the " * 40 + "end"]  # one over 77 tokens
    ids = np.asarray(tokenize(texts))
    assert ids.shape == (4, 77) and ids[1, -1] == tokenize.end_id  # truncated, the end token kept last
    with torch.no_grad():
        expected = ref.encode_text(torch.from_numpy(ids).long()).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = text_embeddings.encode(ours, tokenize, texts, batch_size=2)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_inputs_name_what_is_wrong(tmp_path, synthetic_dir):
    c = runlocal(synthetic_dir)
    # a description missing for a training image
    gpt4image.run(_embed(c), str(tmp_path / "ok"))
    described = json.loads((tmp_path / "ok" / "image_descriptions.json").read_text())
    dropped = sorted(described)[5]
    del described[dropped]
    (tmp_path / "partial.json").write_text(json.dumps(described))
    bad = runlocal(synthetic_dir, gpt4image__descriptions=str(tmp_path / "partial.json"))
    with pytest.raises(sources.DataError, match=f"1 of 192 training image.*{dropped}"):
        gpt4image.run(bad, str(tmp_path / "missing"))
    # a store whose array and keys disagree, and one of another width than the CLIP's
    store = tmp_path / "ok" / "text_embeddings"
    keys = json.loads((store / "keys.json").read_text())
    (store / "keys.json").write_text(json.dumps(keys[:-1]))
    with pytest.raises(embedding_store.EmbeddingStoreError, match="lists 191 keys"):
        gpt4image.run(runlocal(synthetic_dir, gpt4image__embeddings=str(store)), str(tmp_path / "count"))
    embedding_store.write(store, keys, np.ones((len(keys), 8), np.float32))
    with pytest.raises(embedding_store.EmbeddingStoreError, match="8-d but the CLIP text tower"):
        gpt4image.run(runlocal(synthetic_dir, gpt4image__embeddings=str(store)), str(tmp_path / "width"))
    # an image folder with a class that has no images
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for name in ("a", "b"):
            os.makedirs(root / split / name)
    shutil.copy(_an_image(synthetic_dir), root / "train" / "a" / "1.png")
    shutil.copy(_an_image(synthetic_dir), root / "val" / "a" / "1.png")
    folder = runlocal(synthetic_dir, gpt4image__text_loss=False, data__source="folder", data__folder=str(root),
                      data__eval_split="val")
    with pytest.raises(sources.DataError, match=r"1 of 2 class folder\(s\) have no images.*'b'"):
        gpt4image.run(folder, str(tmp_path / "folder_run"))
    # bad values name their key
    for key, value, match in (("gpt4image__text_loss_scale", "reference:0", "text_loss_scale"),
                              ("model__arch", "resnet51", "config.model.arch"),
                              ("data__minival_fraction", 0.7, "minival_fraction"),
                              ("data__randaugment", "rand-m9-w0-inc1", "config.data.randaugment.*w0"),
                              ("data__repeated_augmentation", 0, "repeated_augmentation"),
                              ("data__interpolation", "nearest", "config.data.interpolation"),
                              ("data__random_erasing", 1.5, "random_erasing")):
        with pytest.raises(config_lib.ConfigError, match=match):
            gpt4image.validate(runlocal(synthetic_dir, **{key: value}))


@pytest.mark.slow
def test_deit_recipe_trains_with_its_augmentations_and_timm_schedule(tmp_path, synthetic_dir):
    c = gpt4image_config.get_config("model=deit_b,runlocal")
    assert (c.data.randaugment, c.data.random_erasing, c.data.repeated_augmentation, c.data.interpolation,
            c.optim.schedule) == ("rand-m9-mstd0.5-inc1", 0.25, 3, "bicubic", "timm_cosine")
    c.data.synthetic.dir = synthetic_dir
    c.train.update(dict(epochs=3, log_every=1))
    c.optim.warmup_steps = 2
    out = gpt4image.run(c, str(tmp_path))["gpt4image"]
    per_epoch = out["run"]["steps_per_epoch"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lr_by_epoch = {}
    for r in records:
        if "train/lr" in r:
            lr_by_epoch.setdefault((r["step"] - 1) // per_epoch, set()).add(round(r["train/lr"], 9))
    start, top = c.optim.warmup_init_lr, c.optim.lr
    # DeiT's stepping of timm's schedule: epochs 0 and 1 at the warm-up start, epoch 2 half-way up
    assert lr_by_epoch[0] == lr_by_epoch[1] == {round(start, 9)}
    assert lr_by_epoch[2] == {round(start + (top - start) / 2, 9)}
    assert 0.0 <= out["deit_b"]["raw_final"]["test_top1"] <= 1.0


def _embed(c):
    c = c.copy_and_resolve_references()
    c.mode = "embed"
    return c


def _an_image(synthetic_dir):
    for dirpath, _, filenames in os.walk(synthetic_dir):
        for f in filenames:
            if f.endswith((".png", ".jpg")):
                return os.path.join(dirpath, f)
    raise AssertionError("no image")


@pytest.mark.slow
def test_compare_reports_mean_and_std_over_seeds(tmp_path, synthetic_dir):
    c = runlocal(synthetic_dir)
    c.mode = "compare"
    c.compare.seeds = (0, 1)
    c.train.epochs = 1
    table = gpt4image.run(c, str(tmp_path))["gpt4image"]["resnet50"]
    assert set(table) == {"text_loss", "baseline"}
    for variant, row in table.items():
        seeds = json.loads((tmp_path / variant / "seed_1" / "results.json").read_text())
        model = "resnet50" if variant == "text_loss" else "resnet50 (baseline)"
        per_seed = [json.loads((tmp_path / variant / f"seed_{s}" / "results.json").read_text())["gpt4image"][model]
                    ["raw_final"]["test_top1"] for s in (0, 1)]
        assert row["test_top1"] == pytest.approx(np.mean(per_seed))
        assert row["test_top1_std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert seeds["run"]["gpt4image"]["text_loss"] == ("on" if variant == "text_loss" else "off")
    md = (tmp_path / "results.md").read_text()
    assert "text_loss" in md and "baseline" in md and "±" in md
