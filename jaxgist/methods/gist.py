"""GIST end to end (``config.method = "gist"``): caption matching, contrastive fine-tuning, embeddings,
probes and zero-shot, each stage reading what the previous one wrote in the workdir.

    python -m jaxgist --config configs/gist.py:dataset=cub,shots=5 --workdir runs/cub --config.data.image_dir=...
    results = gist.run(config, workdir)   # {"gist": {"pretrained"|"finetuned": {head: metrics}}}

Stages (``config.gist.stages``, in this order; any subset, e.g. ``("embed", "evaluate")`` to re-evaluate):
``pretrain`` (offline demo only: a CLIP from scratch -> ``pretrain/hf``), ``match`` (top
``gist.match_k`` descriptions of each training image's class -> ``match/captions_top{k}.json``),
``summarize`` (optional, off by default: each matched description shortened by the LLM endpoint of
``config.describe`` -> ``summarize/captions_short.json``, which fine-tuning then reads),
``finetune`` (-> ``finetune/``, resumable), ``embed`` (pretrained and fine-tuned ->
``embeddings/{pretrained,finetuned}.npz``), ``evaluate`` (zero-shot, ``gist.probes``, ``gist.heads``,
chosen on validation; test top-1/top-3 with bootstrap -> ``results.json``, ``results.md``, and each
head's test predictions -> ``predictions/{pretrained,finetuned}.npz``, read by ``jaxgist.reports``).
Each stage in detail and the fidelity notes: docs/methods/gist.md.
"""

from __future__ import annotations

import copy
import pathlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxgist.core import arrays
from jaxgist.core import config as config_lib
from jaxgist.core import files, results
from jaxgist.data import datasets
from jaxgist.evaluation import accuracy, embeddings, zero_shot
from jaxgist.heads import probes
from jaxgist.heads import registry as heads_lib
from jaxgist.methods import caption_matching, describe, finetune
from jaxgist.models import clip
from jaxgist.models.clip import tokenizer
from jaxgist.training import checkpoint, parallel

STAGES = ("pretrain", "match", "summarize", "finetune", "embed", "evaluate")
PROBES = ("sgd", "ridge", "lbfgs")


def default_config() -> ml_collections.ConfigDict:
    c = finetune.default_config()
    c.method = "gist"
    c.gist = ml_collections.ConfigDict(dict(
        stages=("match", "finetune", "embed", "evaluate"),
        match_model="ViT-B-32/laion2b_s34b_b79k", match_k=5, batch_size=64, splits=("train", "val", "test"),
        probes=("sgd",), sgd=dict(lr=0.5, epochs=1000, batch_size=64), normalize_features=False,
        zero_shot_templates=("a photo of a {}.",), bootstrap=1000, eval_step=-1, seed=0,
        augment_views=0, heads=(), coder_knowledge="",
        image_descriptions="",  # {filename: description} of every image (describe's image_descriptions): the hybrid head
    ))
    c.pretrain = ml_collections.ConfigDict(dict(
        synthetic=dict(first_class=20, num_classes=20, train_per_class=20, image_size=80, seed=1, num_captions=5),
        steps=300, global_batch=64, lr=1e-3, warmup_steps=30, weight_decay=0.1, num_captions=5,
    ))
    c.describe = describe.default_config().describe  # the summarize stage's endpoint (off by default)
    c.describe.task = "summarize"
    c.report = False  # python -m jaxgist also writes DIR/report/ (tables, figures, gallery: jaxgist.reports)
    return c


def validate(config) -> None:
    config_lib.check_keys(config, default_config(), free=("model.preset", "mesh", "sharding.rules"))
    g = config.gist
    req = config_lib.require
    unknown = [s for s in g.stages if s not in STAGES]
    req(not unknown, f"config.gist.stages has unknown stage(s) {unknown}; stages are {STAGES}")
    req(list(g.stages) == [s for s in STAGES if s in g.stages],
        f"config.gist.stages={tuple(g.stages)} must keep the order {STAGES}")
    bad_heads = [h for h in g.heads if h not in heads_lib.HEADS]
    req(not bad_heads, f"config.gist.heads has unknown head(s) {bad_heads}; heads are {heads_lib.HEADS}")
    req(g.augment_views >= 0, f"config.gist.augment_views={g.augment_views} must be >= 0")
    bad = [p for p in g.probes if p not in PROBES]
    req(not bad, f"config.gist.probes has unknown probe(s) {bad}; probes are {PROBES}")
    req(g.match_k >= 1, f"config.gist.match_k={g.match_k} must be >= 1")
    req(g.match_k >= config.data.num_captions,
        f"config.data.num_captions={config.data.num_captions} exceeds config.gist.match_k={g.match_k}: "
        f"fine-tuning pairs each image with its first num_captions matched captions")
    req(g.batch_size >= 1 and g.bootstrap >= 0, "config.gist.batch_size must be >= 1 and bootstrap >= 0")
    req(len(g.splits) > 0, "config.gist.splits must name at least one split to embed")
    req(set(g.splits) >= {"train", "val", "test"} or "evaluate" not in g.stages,
        f"config.gist.splits={tuple(g.splits)} must include train, val and test for the evaluate stage")
    if "hybrid" in g.heads:
        req(bool(g.image_descriptions), "config.gist.heads has 'hybrid' (FLIP's image + caption head): set "
            "config.gist.image_descriptions to a {filename: description} file of every image "
            "(configs/describe.py:task=image_descriptions)")
    if "summarize" in g.stages:
        req(bool(config.describe.base_url) and bool(config.describe.model),
            "config.gist.stages has 'summarize': set config.describe.base_url and config.describe.model (an "
            "OpenAI-compatible endpoint; see configs/describe.py)")
    if "match" in g.stages:
        caption_matching.check_data(config.data)
    req(config.mode == "train", f"config.mode={config.mode!r}: GIST runs its stages (config.gist.stages); "
        f"evaluate a finished run with config.gist.stages=('embed', 'evaluate')")
    # the fine-tuning stage's and the data's settings fail now, not after matching has finished
    datasets.validate(config.data)
    if "finetune" in g.stages:
        finetune.validate(finetune_config(config, config.model.init, ""), check_data=False)
    if "pretrain" in g.stages:
        try:
            finetune.validate(pretrain_config(config, pathlib.Path("workdir")), check_data=False)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"the pretrain stage (set by config.pretrain): {e}") from None


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def _model_config(config, init: str) -> ml_collections.ConfigDict:
    """``config.model`` with other weights: a different checkpoint keeps only the numerics (its
    activation is its own, never the fine-tuned model's ``model.act``)."""
    m = copy.deepcopy(config.model)
    if init != m.init:
        m.act = ""
    m.init = init
    return m


def pretrain_config(config, workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The fine-tuning job's config of the ``pretrain`` stage (from scratch, synthetic classes)."""
    p = config.pretrain
    c = finetune.default_config()
    c.model = copy.deepcopy(config.model)
    c.model.init = ""
    c.data = copy.deepcopy(config.data)
    c.data.source = "synthetic"
    c.data.synthetic.update(dict(p.synthetic.to_dict(), dir=str(workdir / "pretrain_data"),
                                 val_per_class=2, test_per_class=0, shots=()))
    c.data.num_captions = p.num_captions
    c.train.update(dict(global_batch=p.global_batch, steps=p.steps, epochs=0, save_every=max(p.steps // 3, 1),
                        eval_every=0, log_every=max(p.steps // 10, 1), export_hf=True))
    c.optim.update(dict(name="adamw", lr=p.lr, weight_decay=p.weight_decay, schedule="cosine",
                        warmup_steps=p.warmup_steps, grad_clip_norm=1.0))
    c.mesh, c.sharding, c.distributed, c.seed = config.mesh, config.sharding, config.distributed, config.seed
    return c


def pretrain(config, workdir: pathlib.Path) -> dict:
    """Trains config.model.preset from scratch on a synthetic dataset of other classes; exports it."""
    p = config.pretrain
    logging.info("gist/pretrain: %d steps on %d synthetic classes", p.steps, p.synthetic.num_classes)
    out = finetune.run(pretrain_config(config, workdir), str(workdir / "pretrain"))["finetune"]
    return {k: v for k, v in out.items() if k in ("steps", "final_loss", "images_per_s", "seconds")}


def pretrained_init(config, workdir: pathlib.Path) -> str:
    """The weights every stage starts from: the demo's pretrained export, else config.model.init."""
    exported = workdir / "pretrain" / "hf"
    if "pretrain" in config.gist.stages or (not config.model.init and exported.is_dir()):
        return str(exported)
    if not config.model.init:
        raise config_lib.ConfigError("config.model.init (pretrained weights) must be set, or run the 'pretrain' stage")
    return config.model.init


def matched_captions_path(config, workdir: pathlib.Path) -> pathlib.Path:
    """Where the match stage writes (and later stages read) each image's top ``gist.match_k`` captions."""
    return workdir / "match" / f"captions_top{config.gist.match_k}.json"


def match(config, workdir: pathlib.Path, init: str) -> tuple[dict, str]:
    g = config.gist
    out = matched_captions_path(config, workdir)
    figures = caption_matching.match_split(_model_config(config, g.match_model or init), config.data, workdir, out,
                                           k=g.match_k, batch_size=g.batch_size, seed=config.seed)
    return {k: v for k, v in figures.items() if k != "captions"}, str(out)


def summarized_captions_path(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "summarize" / "captions_short.json"


def summarize(config, workdir: pathlib.Path, captions: str) -> tuple[dict, str]:
    """GIST's optional step after matching: each matched description summarized into a short caption by
    the endpoint of ``config.describe`` (-> ``summarize/captions_short.json``, read by fine-tuning)."""
    if not captions:
        raise config_lib.ConfigError("the summarize stage needs matched captions: run 'match' first or set "
                                     "config.data.captions")
    c = describe.default_config()
    c.data = copy.deepcopy(config.data)
    c.describe.update(config.describe.to_dict())
    c.describe.update(dict(task="summarize", captions=captions))
    out = describe.run_task(c, workdir, output=summarized_captions_path(workdir))
    return {k: v for k, v in out.items() if k != "output"}, out["output"]


def finetune_config(config, init: str, captions: str, workdir: pathlib.Path | None = None) -> ml_collections.ConfigDict:
    """The fine-tuning job's config of the ``finetune`` stage: GIST's model, optimizer, train and mesh
    settings, starting from ``init`` on the matched ``captions`` (synthetic data is read as the GIST
    files it wrote under ``workdir``)."""
    c = finetune.default_config()
    for key in ("seed", "mode", "evaluate", "mesh", "sharding", "distributed", "optim", "train"):
        c[key] = copy.deepcopy(config[key])
    c.model = _model_config(config, init)
    c.data = copy.deepcopy(config.data)
    if config.data.skip_unreadable:  # an image matching skipped has no captions: fine-tuning skips it too
        c.data.missing_captions = "skip"
    if captions:
        if c.data.source == "synthetic" and workdir is not None:
            paths = datasets.paths(config.data, workdir)
            c.data.source = "gist"
            c.data.update(dict(metadata=paths["metadata"], image_dir=paths["image_dir"],
                               descriptions=paths["descriptions"]))
        c.data.captions = captions
    return c


def finetune_stage(config, workdir: pathlib.Path, init: str, captions: str) -> dict:
    return finetune.run(finetune_config(config, init, captions, workdir), str(workdir / "finetune"))["finetune"]


def compile_inputs(config, mesh):
    """The fine-tuning stage's train step, for ahead-of-time compilation (``python -m jaxgist.aot``)."""
    return finetune.compile_inputs(finetune_config(config, config.model.init, ""), mesh)


def embed(config, workdir: pathlib.Path, init: str) -> dict:
    g = config.gist
    out_dir = workdir / "embeddings"
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {"pretrained": lambda: clip.from_config(_model_config(config, init), seed=config.seed)}
    ft = workdir / "finetune" / "checkpoints"
    if ft.is_dir():
        step = None if g.eval_step < 0 else g.eval_step
        models["finetuned"] = lambda: checkpoint.load_model(ft, _model_config(config, init), step)[0]
    else:
        logging.warning("gist/embed: no fine-tuned checkpoints in %s; embedding the pretrained model only", ft)
    class_names = datasets.source(config.data, "train", workdir, with_captions=False).class_names
    tokenize = tokenizer.load(config.model.tokenizer or None)
    summary = {}
    for name, make in models.items():
        model = make()
        splits = {}
        for split in g.splits:
            source = datasets.source(config.data, split, workdir, with_captions=False)
            splits[split] = embeddings.encode_source(model, source, batch_size=g.batch_size,
                                                     workers=config.data.workers,
                                                     skip_unreadable=config.data.skip_unreadable,
                                                     normalize=g.normalize_features,
                                                     crop_rounding=config.data.crop_rounding)
        if g.augment_views:
            train = datasets.source(config.data, "train", workdir, with_captions=False)
            views = [embeddings.encode_source(model, train, batch_size=g.batch_size, workers=config.data.workers,
                                              skip_unreadable=config.data.skip_unreadable,
                                              normalize=g.normalize_features, augment_seed=g.seed * 1000 + v)
                     for v in range(g.augment_views)]
            splits["trainviews"] = {"x": np.stack([v["x"] for v in views]), "y": views[0]["y"],
                                    "index": views[0]["index"]}
        text = {"templates": zero_shot.class_embeddings(model, tokenize, class_names, tuple(g.zero_shot_templates))}
        if any(h.startswith("coder") for h in g.heads):
            text.update(heads_lib.knowledge_arrays(model, _knowledge(config, workdir, class_names), tokenize))
        if "hybrid" in g.heads:
            text.update(_caption_embeddings(config, workdir, model, tokenize, splits))
        if jax.process_index() == 0:  # every process has every embedding: one writes them
            embeddings.save(out_dir / f"{name}.npz", splits, class_names)
            embeddings.save_arrays(out_dir / f"{name}_text.npz", **text)
        parallel.sync(f"gist.embed.{name}")
        summary[name] = {split: int(len(d["y"])) for split, d in splits.items()}
        logging.info("gist/embed: %s embeddings of %s", name, summary[name])
    return summary


def _caption_embeddings(config, workdir, model, tokenize, splits) -> dict[str, np.ndarray]:
    """``caption_<split>``: the unit text embedding of each embedded image's description (the file
    ``gist.image_descriptions``, keyed by the metadata's filename), row for row with the image embeddings."""
    from jaxgist.data.sources import DataError, read_image_descriptions

    path = config.gist.image_descriptions
    described = read_image_descriptions(path)
    out = {}
    for split in config.gist.splits:
        source = datasets.source(config.data, split, workdir, with_captions=False)
        names = [source[int(i)]["filename"] for i in splits[split]["index"]]
        missing = [n for n in names if n not in described]
        if missing:
            raise DataError(f"{path}: {len(missing)} {split} image(s) have no description, e.g. {missing[:3]}; "
                            f"write them with configs/describe.py:task=image_descriptions")
        out[f"caption_{split}"] = embeddings.encode_texts(model, tokenize([described[n] for n in names]),
                                                          batch_size=config.gist.batch_size)
    return out


def evaluate(config, workdir: pathlib.Path) -> dict:
    g = config.gist
    out: dict = {}
    for name in ("pretrained", "finetuned"):
        path = workdir / "embeddings" / f"{name}.npz"
        if not path.exists():
            continue
        splits, class_names = embeddings.load(path)
        tr, va, te = splits["train"], splits["val"], splits["test"]
        predicted: dict[str, np.ndarray] = {}
        for kind in g.probes:
            t0 = time.perf_counter()
            if kind == "sgd":
                probe = probes.sgd_probe(tr["x"], tr["y"], va["x"], va["y"], len(class_names), lr=g.sgd.lr,
                                         epochs=g.sgd.epochs, batch_size=g.sgd.batch_size, seed=g.seed)
            elif kind == "ridge":
                probe = probes.ridge_probe(tr["x"], tr["y"], va["x"], va["y"], len(class_names))
            else:
                probe = probes.lbfgs_probe(tr["x"], tr["y"], va["x"], va["y"], len(class_names))
            logits = probe.predict_logits(te["x"])
            predicted[f"linear_probe_{kind}"] = np.asarray(logits).argmax(axis=1)
            metrics = accuracy.accuracy_summary(logits, te["y"], resamples=g.bootstrap, seed=g.seed)
            metrics.update({k: v for k, v in probe.summary().items() if k != "method"})
            metrics["seconds"] = round(time.perf_counter() - t0, 2)
            out.setdefault(name, {})[f"linear_probe_{kind}"] = metrics
        with np.load(workdir / "embeddings" / f"{name}_text.npz") as f:
            cached = dict(f)
        out.setdefault(name, {})["zero_shot"] = _zero_shot(cached["templates"], te, g, predicted)
        if g.heads:
            knowledge = None
            if any(h.startswith("coder") for h in g.heads):
                knowledge = heads_lib.load_knowledge_embeddings(_knowledge(config, workdir, class_names), cached)
            for split in ("train", "val", "test"):
                if f"caption_{split}" in cached:
                    splits[split]["caption_x"] = cached[f"caption_{split}"]
            found = heads_lib.run(tuple(g.heads), splits, cached["templates"], knowledge, bootstrap=g.bootstrap,
                                  seed=g.seed, predictions=predicted)
            out.setdefault(name, {}).update(found)
        if jax.process_index() == 0:
            save_predictions(predictions_path(workdir, name), class_names, te["y"],
                             te.get("index", np.arange(len(te["y"]))), predicted)
    if not out:
        raise FileNotFoundError(f"no embeddings in {workdir / 'embeddings'}: run the 'embed' stage first")
    return out


def _knowledge(config, workdir, class_names):
    """CODER knowledge: the file ``gist.coder_knowledge`` if set; for synthetic data, the knowledge file
    the dataset wrote; else generated from the class names."""
    path = config.gist.coder_knowledge
    if not path and config.data.source == "synthetic":
        path = datasets.paths(config.data, workdir)["coder_knowledge"]
    return heads_lib.knowledge_for(class_names, path=path)


def _zero_shot(text_weights, test, g, predicted: dict) -> dict:
    """Zero-shot top-k of the test embeddings against the class text embeddings the embed stage cached
    (its top-1 classes go to ``predicted["zero_shot"]``)."""
    logits = 100.0 * arrays.l2_normalize(test["x"]) @ text_weights.T
    predicted["zero_shot"] = np.asarray(logits).argmax(axis=1)
    return accuracy.accuracy_summary(logits, test["y"], resamples=g.bootstrap, seed=g.seed)


def predictions_path(workdir, model: str) -> pathlib.Path:
    """Where the evaluate stage writes the test predictions of every head of ``model`` (pretrained, finetuned)."""
    return pathlib.Path(workdir) / "predictions" / f"{model}.npz"


def save_predictions(path, class_names, labels, index, predicted: dict) -> None:
    """``path`` (.npz): ``class_names``, the test ``labels`` and embedding ``index`` (rows of the test
    split), and ``pred_<head>``: each head's top-1 class, row for row."""
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    embeddings.save_arrays(path, class_names=np.asarray(list(class_names)), labels=np.asarray(labels, np.int32),
                           index=np.asarray(index), **{f"pred_{head}": np.asarray(p, np.int32)
                                                       for head, p in predicted.items()})


def load_predictions(path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """What ``save_predictions`` wrote: (class names, test labels, {head: top-1 classes})."""
    with np.load(path) as f:
        heads = {key[len("pred_"):]: f[key] for key in f.files if key.startswith("pred_")}
        return [str(n) for n in f["class_names"]], f["labels"], heads


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def check_splits(config, workdir: pathlib.Path) -> None:
    """Every split the stages read has rows and all its image files, checked before the first
    expensive stage (a missing test image must not surface after hours of fine-tuning)."""
    stages = set(config.gist.stages)
    needed = set(config.gist.splits) if "embed" in stages else set()
    if stages & {"match", "finetune", "embed"}:
        needed.add("train")
    data = copy.deepcopy(config.data)
    data.check_files = True
    for split in sorted(needed):
        datasets.source(data, split, workdir, with_captions=False)


def run(config, workdir: str) -> dict:
    """Runs ``config.gist.stages``; returns and writes the results: ``{"gist": {model: {head: metrics}}}``
    (models "pretrained", "finetuned"), with each stage's figures under ``run.gist.stages``."""
    t0 = time.perf_counter()
    validate(config)
    if not files.is_local(workdir):
        raise config_lib.ConfigError(f"--workdir={workdir}: GIST's stages write numpy and JSON files with local "
                                     f"file APIs; use a directory (a bucket mounted with gcsfuse works)")
    workdir = pathlib.Path(workdir)
    stages = tuple(config.gist.stages)
    check_splits(config, workdir)
    done: dict = {}
    table: dict = {}
    if "pretrain" in stages:
        done["pretrain"] = pretrain(config, workdir)
    init = pretrained_init(config, workdir)
    captions = config.data.captions
    if "match" in stages:
        done["match"], captions = match(config, workdir, init)
    elif not captions:
        matched = matched_captions_path(config, workdir)
        captions = str(matched) if matched.is_file() else ""
    if "summarize" in stages:
        done["summarize"], captions = summarize(config, workdir, captions)
    elif "match" not in stages and not config.data.captions and summarized_captions_path(workdir).is_file():
        captions = str(summarized_captions_path(workdir))  # a summarize stage ran before: fine-tuning reads it
        logging.info("gist: fine-tuning reads the summarized captions %s", captions)
    if "finetune" in stages:
        ft = finetune_stage(config, workdir, init, captions)
        done["finetune"] = {k: v for k, v in ft.items() if not k.startswith("val_")}
    if "embed" in stages:
        done["embed"] = embed(config, workdir, init)
    if "evaluate" in stages:
        table = evaluate(config, workdir)
    if jax.process_index() == 0:  # stages run earlier keep their results (results.write merges)
        merged = results.write(workdir, "gist", table, run={
            "stages": done, "seconds": round(time.perf_counter() - t0, 1), "jax": jax.__version__})
        logging.info("gist results:\n%s", results.comparison_table(merged["gist"]))
    return {"gist": table}
