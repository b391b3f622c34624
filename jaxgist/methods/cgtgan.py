"""CgT-GAN: an image captioner trained without paired data (Lihr747/CgtGAN). A frozen CLIP image
embedding is mapped to a GPT-2 prefix; a RoBERTa discriminator tells its captions from corpus
sentences; self-critical training rewards captions whose CLIP text embedding is close to the image's
CLIP-aggregated target and that the discriminator takes for real (``cgtgan_step``).

The job (``config.method = "cgtgan"``, see ``configs/cgtgan.py``), by ``config.mode``; each stage
writes into the workdir what the next reads, and ``train`` runs whatever is missing before it:

- ``prepare``: CLIP image embeddings of the train/val/test images (``<workdir>/embeddings/images_<split>``,
  unnormalized, keyed by image id), CLIP text embeddings of the corpus sentences
  (``embeddings/corpus``, unnormalized), and the CLIP-aggregated targets of the training images
  (``embeddings/targets``, ``clip_aggregate``); all in resumable parts.
- ``initialize``: the generator learns to write corpus sentences back from their CLIP *text*
  embeddings (``<workdir>/initialize``), the reference's ``initialization.py``.
- ``train`` (default): the adversarial stage from the initialized generator (``<workdir>/checkpoints``),
  greedy captions of the val images scored every ``train.eval_every_epochs`` epochs; then the test
  split is captioned and scored by the step with the best val CIDEr and by the initialized generator.
- ``evaluate``: captions and metrics of a saved step (``evaluate.step``, -1: the best by val CIDEr).

Results: ``results.json``/``results.md`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when its files are
present), captions in COCO's result format (``captions/<name>_<split>.json``) and a page of example
captions beside their images (``captions/examples.md``).

Resuming: rerun the same command; every stage continues from its last finished part or checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.core import config as config_lib
from jaxgist.core import files, results
from jaxgist.data import captions as captions_lib
from jaxgist.data import datasets, embedding_store, sources
from jaxgist.evaluation import caption_metrics, embeddings, text_embeddings
from jaxgist.methods import cgtgan_step, clip_aggregate
from jaxgist.models import bpe_tokenizer, captioner, clip
from jaxgist.models import gpt2 as gpt2_lib
from jaxgist.models import roberta as roberta_lib
from jaxgist.models.clip import tokenizer as clip_tokenizer
from jaxgist.training import checkpoint, config_checks, loop, optim, parallel
from jaxgist.training import metrics as metrics_lib

MODES = ("prepare", "initialize", "train", "evaluate")
IMAGE_SOURCES = ("karpathy", "synthetic")
CORPUS_STYLES = ("plain", "coco", "gcc")
GENERATOR, DISCRIMINATOR, CLIP = cgtgan_step.GENERATOR, cgtgan_step.DISCRIMINATOR, cgtgan_step.CLIP
# No weight decay on biases and LayerNorms (GPT-2's ln_1/ln_2/ln_f included). The reference's list,
# ['bias', 'LayerNorm.weight'], misses GPT-2's norms, which it decays: REFERENCE_DECAY_EXCLUDE.
DECAY_EXCLUDE = r"(bias|(ln_\d|ln_f|LayerNorm)\.scale)$"
REFERENCE_DECAY_EXCLUDE = r"(bias|LayerNorm\.scale)$"


def default_config() -> ml_collections.ConfigDict:
    """Every key the job reads; defaults: the reference's COCO images <-> COCO captions setting."""
    c = ml_collections.ConfigDict(dict(method="cgtgan", seed=0, mode="train"))
    c.data = ml_collections.ConfigDict(dict(
        images="karpathy", karpathy_json="", image_root="", restval_as_train=True, check_files=True,
        corpus="", corpus_style="coco", corpus_shuffle=True, gcc_reference_seeding=True, max_corpus=0,
        synthetic=datasets.default_config().synthetic.to_dict(), workers=0, prefetch=2, skip_unreadable=False,
        crop_rounding="torchvision"))
    c.clip = clip.default_model_config("ViT-L/14")
    c.clip.update(dict(batch=256, part_size=16384))
    # offline demos only: with steps > 0 and no clip.init, a CLIP of clip.preset is first trained from
    # scratch on generated birds of other species (GIST's pretrain stage) and used as the frozen CLIP
    c.pretrain = ml_collections.ConfigDict(dict(
        steps=0, synthetic=dict(first_class=20, num_classes=20, train_per_class=20, image_size=48, seed=1,
                                num_captions=5),
        global_batch=64, lr=1e-3, warmup_steps=30, weight_decay=0.1, num_captions=5))
    c.tokenizers = ml_collections.ConfigDict(dict(gpt2="gpt2", roberta="roberta-base", vocab_size=1000))
    c.generator = ml_collections.ConfigDict(dict(init="gpt2", prefix_length=10, normalize_prefix=False, overrides={}))
    c.discriminator = ml_collections.ConfigDict(dict(init="roberta-base", overrides={}))
    c.cgtgan = ml_collections.ConfigDict(dict(
        agg_temperature=100.0, agg_part_size=8192, samples=5, max_tokens=20, temperature=1.0, top_k=0, top_p=1.0,
        cos_weight=0.5, clip_weight=0.0, reward_weight=0.5, gan_steps=150, gan_warm_steps=2350, clip_context=77,
        sample_dropout=True))
    c.initialize = ml_collections.ConfigDict(dict(global_batch=16, epochs=1, steps=0, log_every=100, max_sentences=0,
                                                  ignore_token_zero=False))
    c.initialize.optim = optim.default_config()
    c.initialize.optim.update(dict(name="adamw", lr=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                                   decay_exclude=DECAY_EXCLUDE, warmup_steps=5000, schedule="constant"))
    c.train = ml_collections.ConfigDict(dict(global_batch=128, epochs=50, steps=0, log_every=25, eval_every_epochs=1,
                                             keep=2, async_checkpoints=True))
    c.optim = optim.default_config()  # both models (the reference: one learning rate for G and D)
    c.optim.update(dict(name="adamw", lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                        decay_exclude=DECAY_EXCLUDE, grad_clip_norm=1.0, schedule="constant", warmup_steps=150))
    c.discriminator_warmup_steps = 0
    c.evaluate = ml_collections.ConfigDict(dict(step=-1, batch=64, metrics=("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"),
                                                val_metrics=("BLEU", "METEOR", "ROUGE_L", "CIDEr"), examples=8))
    return parallel.add_config(c)


def validate(config, num_devices: int | None = None, *, check_data: bool = True) -> None:
    config_lib.check_keys(config, default_config(), free=("generator.overrides", "discriminator.overrides",
                                                          "clip.preset", "pretrain.synthetic", "mesh", "sharding.rules", "evaluate.metrics",
                                                          "evaluate.val_metrics", "data.synthetic"))
    clip.check_model_config(config.clip)
    req = config_lib.require
    req(config.mode in MODES, f"config.mode={config.mode!r} is not one of {MODES}")
    d = config.data
    req(d.images in IMAGE_SOURCES, f"config.data.images={d.images!r} is not one of {IMAGE_SOURCES}")
    req(d.corpus_style in CORPUS_STYLES, f"config.data.corpus_style={d.corpus_style!r} is not one of {CORPUS_STYLES}")
    if check_data and d.images == "karpathy":
        req(bool(d.karpathy_json) and bool(d.image_root),
            "config.data.karpathy_json and config.data.image_root must name the Karpathy split file "
            "(dataset_coco.json, dataset_flickr30k.json) and the image folder")
    g = config.cgtgan
    req(g.agg_temperature > 0, f"config.cgtgan.agg_temperature={g.agg_temperature} must be > 0")
    req(g.samples >= 1, f"config.cgtgan.samples={g.samples} must be >= 1")
    req(1 <= g.max_tokens, f"config.cgtgan.max_tokens={g.max_tokens} must be >= 1")
    req(g.temperature > 0 and g.top_k >= 0 and 0 < g.top_p <= 1,
        "config.cgtgan: temperature must be > 0, top_k >= 0 and top_p in (0, 1]")
    for key in ("cos_weight", "clip_weight", "reward_weight"):
        req(0.0 <= g[key] <= 1.0, f"config.cgtgan.{key}={g[key]} must be in [0, 1]")
    req(g.gan_steps >= 0 and g.gan_warm_steps >= 1, "config.cgtgan.gan_steps must be >= 0 and gan_warm_steps >= 1")
    req(2 <= g.clip_context <= 77, f"config.cgtgan.clip_context={g.clip_context} must be in [2, 77]")
    req(config.generator.prefix_length >= 1, "config.generator.prefix_length must be >= 1")
    for name, t in (("initialize", config.initialize), ("train", config.train)):
        req(t.global_batch >= 1, f"config.{name}.global_batch={t.global_batch} must be >= 1")
        req(t.steps >= 0 and t.epochs >= 0 and (t.steps > 0 or t.epochs > 0),
            f"set config.{name}.epochs or config.{name}.steps (>= 0 both, one of them > 0)")
    req(config.train.eval_every_epochs >= 1 and config.train.keep >= 1,
        "config.train.eval_every_epochs and config.train.keep must be >= 1")
    req(config.discriminator_warmup_steps >= 0, "config.discriminator_warmup_steps must be >= 0")
    for key in ("metrics", "val_metrics"):
        unknown = sorted({m.upper() for m in config.evaluate[key]} - {m.upper() for m in caption_metrics.METRICS})
        req(not unknown, f"config.evaluate.{key}: unknown metric(s) {unknown}; valid: {caption_metrics.METRICS}")
    req(config.evaluate.step >= -1, f"config.evaluate.step={config.evaluate.step} must be a saved step or -1")
    optim.validate(config.initialize.optim)
    config_checks.check_training(config, num_devices, check_data=False)


def _abstract_models(config, prefix_dim: int, gpt_vocab: int | None, roberta_vocab: int | None, roberta_pad: int = 1):
    """Shape-only generator, discriminator and CLIP of ``config`` (no weights read: hub names are taken as
    the presets they name)."""
    g, d = config.generator, config.discriminator
    fields = dict(prefix_dim=prefix_dim, prefix_length=g.prefix_length, normalize_prefix=g.normalize_prefix)
    gpt_over = {**({"vocab_size": gpt_vocab} if gpt_vocab else {}), **dict(g.overrides)}
    gcfg = gpt2_lib.resolve_config(g.init if g.init in gpt2_lib.PRESETS else "gpt2", **gpt_over)
    rob_over = {**({"vocab_size": roberta_vocab, "pad_token_id": roberta_pad} if roberta_vocab else {}),
                **dict(d.overrides)}
    rcfg = roberta_lib.resolve_config(d.init if d.init in roberta_lib.PRESETS else "roberta-base", **rob_over)
    return {
        GENERATOR: nnx.eval_shape(lambda: captioner.create_captioner(gpt2=gcfg, seed=0, **fields)),
        DISCRIMINATOR: nnx.eval_shape(lambda: captioner.Discriminator(roberta_lib.Roberta(rcfg, rngs=nnx.Rngs(0)),
                                                                      rngs=nnx.Rngs(0))),
        CLIP: clip.text_only(clip.abstract_from_config(config.clip)),
    }


def compile_inputs(config, mesh):
    """(jitted adversarial step, abstract (state, batch), numerics) for ahead-of-time compilation
    (``python -m jaxgist.aot``): GPT-2, RoBERTa and CLIP of the config's presets (hub names read as the
    presets they name; ``tokenizers=train`` vocabularies at ``tokenizers.vocab_size``). Reads no data."""
    import types

    validate(config, num_devices=mesh.size, check_data=False)
    config_checks.check_batch(config, mesh)
    prefix_dim = clip.config_from_model_config(config.clip).embed_dim
    trained = config.tokenizers.vocab_size
    models = _abstract_models(config, prefix_dim, trained if config.tokenizers.gpt2 == "train" else None,
                              trained if config.tokenizers.roberta == "train" else None)
    total = config.train.steps or 1000
    txs, schedules = {}, {}
    for name in (GENERATOR, DISCRIMINATOR):
        txs[name], schedules[name] = optim.make(config.optim, nnx.state(models[name], nnx.Param), total)
    setup = cgtgan_step.build_adversarial(mesh, models, txs, schedules, _rewards(config), rules=config.sharding.rules,
                                          seed=config.seed)
    g = config.cgtgan
    spec = cgtgan_step.adversarial_batch_spec(config.train.global_batch, g.samples, g.max_tokens, prefix_dim,
                                              g.clip_context, g.max_tokens + 2)
    gpt = models[GENERATOR].gpt.config
    name = (f"CgT-GAN: GPT-2 {gpt.layers}x{gpt.width} + RoBERTa "
            f"{models[DISCRIMINATOR].text_encoder.config.layers}x{models[DISCRIMINATOR].text_encoder.config.width}"
            f" + CLIP {config.clip.init or 'preset'} (frozen)")
    numerics = types.SimpleNamespace(param_dtype=jnp.float32, dtype=jnp.float32, remat=False, name=name)
    return setup.update, (setup.abstract_state, cgtgan_step.abstract_batch(spec, mesh)), numerics


def run(config, workdir: str) -> dict:
    parallel.initialize_distributed(config)
    validate(config)
    if config.mode == "prepare":
        return {config.method: {"prepare": prepare(config, workdir)}}
    if config.mode == "initialize":
        return {config.method: {"initialize": initialize(config, workdir)}}
    if config.mode == "evaluate":
        return evaluate_checkpoint(config, workdir)
    return train(config, workdir)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

class ImageSource(sources._RecordSource):
    """Random access over ``CaptionImage``s for the image pipeline (records: path, filename = image id)."""

    def __init__(self, images):
        self._records = [{"path": im.path, "filename": str(im.image_id), "label": 0, "index": i}
                         for i, im in enumerate(images)]
        self.class_names = ["image"]


def split_images(config, workdir, split: str) -> list[captions_lib.CaptionImage]:
    d = config.data
    if d.images == "synthetic":
        c = ml_collections.ConfigDict(datasets.default_config().to_dict())
        c.synthetic.update(dict(d.synthetic))
        dataset = datasets.write_synthetic(c, workdir)
        images = captions_lib.synthetic_caption_images(dataset, split)
        # the generated captions run to 50 words; a 20-token captioner says their first clause
        return [dataclasses.replace(im, captions=tuple(first_clause(t) for t in im.captions)) for im in images]
    return captions_lib.read_karpathy(d.karpathy_json, d.image_root, splits=(split,),
                                      restval_as_train=d.restval_as_train, check_files=d.check_files)


def first_clause(text: str) -> str:
    """``text`` up to its first ",", ":" or ";", ending with "."."""
    head = re.split(r"[,:;]", text, maxsplit=1)[0].strip().rstrip(".")
    return head + "."


def corpus_sentences(config, workdir, train_images) -> list[str]:
    """The text corpus: ``data.corpus`` (a file, one sentence a line), or the training images' own
    captions (the COCO <-> COCO setting) when it is empty. Written to ``<workdir>/corpus.txt``."""
    d = config.data
    if d.corpus:
        texts = captions_lib.read_corpus(d.corpus, style=d.corpus_style, shuffle=d.corpus_shuffle,
                                         gcc_reference_seeding=d.gcc_reference_seeding)
    else:
        texts = captions_lib.corpus_from_karpathy(train_images, style=d.corpus_style, shuffle=d.corpus_shuffle,
                                                  gcc_reference_seeding=d.gcc_reference_seeding)
    if d.max_corpus:
        texts = texts[:d.max_corpus]
    if not texts:
        raise captions_lib.CaptionDataError("the corpus is empty: no sentence to train the discriminator on")
    path = os.path.join(os.fspath(workdir), "corpus.txt")
    if jax.process_index() == 0 and not os.path.isfile(path):
        files.write_text_atomic(path, "\n".join(texts) + "\n")
    return texts


def pretrain_clip(config, workdir) -> str | None:
    """With ``pretrain.steps`` and no ``clip.init`` (offline demos): trains ``clip.preset`` from scratch on
    generated birds of other species than the captioning set's, with their captions (GIST's pretrain
    stage, ``<workdir>/pretrain``), once; returns its Hugging Face export (None when not configured)."""
    if not config.pretrain.steps or config.clip.init:
        return None
    from jaxgist.methods import gist

    workdir = files.path(workdir)
    exported = workdir / "pretrain" / "hf"
    if not (exported / "config.json").exists():
        shim = gist.default_config()
        shim.model.update(dict(init="", preset=dict(config.clip.preset)))
        shim.pretrain.update(config.pretrain.to_dict())
        shim.mesh, shim.sharding, shim.distributed, shim.seed = config.mesh, config.sharding, config.distributed, \
            config.seed
        gist.pretrain(shim, workdir)
    return str(exported)


def clip_config(config, workdir):
    """``config.clip``, with ``init`` the demo's pretrained CLIP when ``pretrain`` is configured."""
    c = ml_collections.ConfigDict(config.clip.to_dict())
    exported = pretrain_clip(config, workdir)
    if exported:
        c.init, c.preset = exported, None
    return c


def _store(workdir, name: str) -> str:
    return os.path.join(os.fspath(workdir), "embeddings", name)


def _image_store(config, workdir, model, split: str, images) -> embedding_store.EmbeddingStore:
    directory = _store(workdir, f"images_{split}")
    if not embedding_store.exists(directory):
        logging.info("cgtgan: CLIP image embeddings of %d %s images -> %s", len(images), split, directory)
        out = embeddings.encode_source(model, ImageSource(images), batch_size=config.clip.batch // 4 or 1,
                                       workers=config.data.workers, prefetch=config.data.prefetch,
                                       skip_unreadable=config.data.skip_unreadable, normalize=False,
                                       crop_rounding=config.data.crop_rounding)
        keys = [str(images[i].image_id) for i in out["index"]]
        if len(keys) < len(images):
            logging.warning("cgtgan: %d of %d %s images were unreadable and are left out", len(images) - len(keys),
                            len(images), split)
        if jax.process_index() == 0:
            embedding_store.write(directory, keys, out["x"])
        parallel.sync(f"jaxgist cgtgan {split} image embeddings written")
    return embedding_store.EmbeddingStore(directory)


def _rows(store: embedding_store.EmbeddingStore, keys) -> np.ndarray:
    return np.stack([store.vector(str(k)) for k in keys]).astype(np.float32)


def prepare(config, workdir) -> dict:
    """The CLIP embeddings and the CLIP-aggregated targets (module docstring); returns their figures."""
    t0 = time.perf_counter()
    clip_cfg = clip_config(config, workdir)
    model = clip.from_config(clip_cfg, seed=config.seed)
    tokenize = clip_tokenizer.load(config.clip.tokenizer or None)
    train_images = split_images(config, workdir, "train")
    out = {}
    stores = {}
    for split in ("train", "val", "test"):
        images = train_images if split == "train" else split_images(config, workdir, split)
        stores[split] = _image_store(config, workdir, model, split, images)
        out[f"{split}_images"] = len(stores[split])
    texts = corpus_sentences(config, workdir, train_images)
    corpus_dir = _store(workdir, "corpus")
    keys = [f"{i:09d}" for i in range(len(texts))]
    if not embedding_store.exists(corpus_dir):
        text_embeddings.build_store(model, tokenize, dict(zip(keys, texts)), corpus_dir,
                                    part_size=config.clip.part_size, batch_size=config.clip.batch,
                                    pad_id=tokenize.pad_id, model_id=clip_cfg.init or repr(clip_cfg.preset),
                                    normalize=False)
    corpus = embedding_store.EmbeddingStore(corpus_dir)
    out["corpus_sentences"] = len(corpus)
    targets_dir = _store(workdir, "targets")
    if not embedding_store.exists(targets_dir):
        train_keys = list(stores["train"].keys)
        clip_aggregate.write_targets(targets_dir, train_keys, _rows(stores["train"], train_keys), corpus.array,
                                     config.cgtgan.agg_temperature, part_size=config.cgtgan.agg_part_size)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _prepared(config, workdir) -> bool:
    return all(embedding_store.exists(_store(workdir, n))
               for n in ("images_train", "images_val", "images_test", "corpus", "targets"))


# ---------------------------------------------------------------------------------------------
# Tokenizers and models
# ---------------------------------------------------------------------------------------------

def load_tokenizers(config, workdir, texts=None):
    """(GPT-2 tokenizer, RoBERTa tokenizer): HF directories or hub names, or ``"train"``: a small
    byte-level BPE trained on the corpus (offline demos), kept in ``<workdir>/tokenizers``."""
    out = []
    for kind, name in (("gpt2", config.tokenizers.gpt2), ("roberta", config.tokenizers.roberta)):
        if name == "train":
            directory = os.path.join(os.fspath(workdir), "tokenizers", kind)
            if not os.path.isfile(os.path.join(directory, "merges.txt")):
                if texts is None:
                    texts = _read_corpus_file(workdir)
                if jax.process_index() == 0:
                    bpe_tokenizer.train(texts, directory, kind, vocab_size=config.tokenizers.vocab_size)
                parallel.sync(f"jaxgist cgtgan {kind} tokenizer trained")
            out.append(bpe_tokenizer.load(directory, kind))
        else:
            out.append(bpe_tokenizer.load(name, kind))
    return tuple(out)


def _read_corpus_file(workdir) -> list[str]:
    path = os.path.join(os.fspath(workdir), "corpus.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run with config.mode=prepare first")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def make_generator(config, prefix_dim: int, vocab_size: int, *, seed: int, abstract: bool = False):
    g = config.generator
    fields = dict(prefix_dim=prefix_dim, prefix_length=g.prefix_length, normalize_prefix=g.normalize_prefix)
    if g.init and not abstract:
        return captioner.create_captioner(gpt2=g.init, seed=seed, **fields)
    if g.init:  # shapes only: the checkpoint's config
        gcfg = gpt2_lib.load(g.init).config
    else:
        gcfg = gpt2_lib.resolve_config("gpt2", **{"vocab_size": vocab_size, **dict(g.overrides)})
    make = lambda: captioner.create_captioner(gpt2=gcfg, seed=seed, **fields)  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


def make_discriminator(config, vocab_size: int, pad_id: int, *, seed: int):
    d = config.discriminator
    if d.init:
        return captioner.create_discriminator(d.init, seed=seed)
    rcfg = roberta_lib.resolve_config("roberta-base", **{"vocab_size": vocab_size, "pad_token_id": pad_id,
                                                          **dict(d.overrides)})
    return captioner.create_discriminator(roberta_lib.Roberta(rcfg, rngs=nnx.Rngs(seed + 1)), seed=seed)


def _check_vocab(model_vocab: int, tok, what: str) -> None:
    if tok.vocab_size > model_vocab:
        raise ValueError(f"the {what} tokenizer has {tok.vocab_size} tokens but the {what} model's vocabulary has "
                         f"{model_vocab}: use the tokenizer the model was trained with")


# ---------------------------------------------------------------------------------------------
# Step-indexed batches (resumable without iterator state beyond a position)
# ---------------------------------------------------------------------------------------------

class StepBatches:
    """Batches of row indices over ``n`` records, a fresh permutation per epoch (seeded by (seed, epoch)),
    ``batch`` rows each, the epoch's remainder dropped. The position is the whole state: grain's
    checkpoint handler saves it (``get_state``/``set_state``) beside the model."""

    def __init__(self, n: int, batch: int, seed: int):
        if n < batch:
            raise ValueError(f"a batch of {batch} needs at least {batch} records; there are {n}")
        self.n, self.batch, self.seed, self.position = n, batch, seed, 0
        self.per_epoch = n // batch
        self._perm_epoch, self._perm = -1, None

    def rows(self, position: int) -> np.ndarray:
        epoch, i = divmod(position, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm[i * self.batch:(i + 1) * self.batch]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, np.ndarray]:
        out = (self.position, self.rows(self.position))
        self.position += 1
        return out

    def get_state(self) -> bytes:
        return json.dumps({"position": self.position, "n": self.n, "batch": self.batch}).encode()

    def set_state(self, state: bytes) -> None:
        s = json.loads(state)
        if (s["n"], s["batch"]) != (self.n, self.batch):
            raise ValueError(f"the checkpoint's data position is for {s['n']} records in batches of {s['batch']}; "
                             f"this run has {self.n} in batches of {self.batch}")
        self.position = int(s["position"])

    def start_prefetch(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------------

def _sentence_tokens(tok, texts, ignore_token_zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """GPT-2 ids [N, L] and mask, L = min(mean + 10 std, max) of the lengths (the reference's)."""
    ids = tok.encode(list(texts), add_special_tokens=False)
    lengths = np.asarray([len(x) for x in ids], np.float64)
    length = int(max(1, min(int(lengths.mean() + lengths.std() * 10), int(lengths.max()))))
    tokens = np.zeros((len(ids), length), np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for row, seq in enumerate(ids):
        seq = seq[:length]
        tokens[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    if ignore_token_zero:  # the reference's cross_entropy(ignore_index=0) also skips real tokens of id 0
        mask &= (tokens != 0).astype(np.int32)
    return tokens, mask


def _total(t, per_epoch: int) -> int:
    return int(t.steps or t.epochs * per_epoch)


def initialize(config, workdir) -> dict:
    """Teacher forcing from corpus sentences' CLIP text embeddings; returns its figures."""
    if not _prepared(config, workdir):
        prepare(config, workdir)
    workdir = files.path(workdir)
    directory = workdir / "initialize"
    texts = _read_corpus_file(workdir)
    corpus = embedding_store.EmbeddingStore(_store(workdir, "corpus"))
    gpt_tok, _ = load_tokenizers(config, workdir, texts)
    n = len(texts) if not config.initialize.max_sentences else min(len(texts), config.initialize.max_sentences)
    tokens, mask = _sentence_tokens(gpt_tok, texts[:n], config.initialize.ignore_token_zero)
    prefixes = corpus.array  # memory-mapped: the rows of each batch are read when it is built
    t = config.initialize
    batches = StepBatches(n, t.global_batch, config.seed)
    total = _total(t, batches.per_epoch)
    mesh = parallel.make_mesh(config.mesh)
    abstract = make_generator(config, corpus.dim, gpt_tok.vocab_size, seed=config.seed, abstract=True)
    _check_vocab(abstract.gpt.config.vocab_size, gpt_tok, "GPT-2")
    tx, schedule = optim.make(t.optim, nnx.state(abstract, nnx.Param), total)
    setup = cgtgan_step.build_initialization(mesh, abstract, tx, schedule, rules=config.sharding.rules,
                                             seed=config.seed)
    ckpt = checkpoint.Checkpointer(directory / "checkpoints", save_every=max(batches.per_epoch, 1), keep=1,
                                   async_save=False)
    state, start = loop.restore_or_init(
        ckpt, setup.abstract_state,
        lambda: setup.layout.init({GENERATOR: make_generator(config, corpus.dim, gpt_tok.vocab_size,
                                                             seed=config.seed)}), batches)
    logging.info("cgtgan initialize: %d sentences of up to %d tokens, %d steps of %d", n, tokens.shape[1], total,
                 t.global_batch)

    def to_device(item):
        _, rows = item
        rows = np.sort(rows)
        return parallel_batch(mesh, {"prefix_embeds": np.asarray(prefixes[rows], np.float32),
                                     "tokens": tokens[rows], "mask": mask[rows]})

    t0 = time.perf_counter()
    if start < total:
        logger = metrics_lib.MetricsLogger(directory, total_steps=total, global_batch=t.global_batch,
                                           log_every=t.log_every, resume_step=start if start else None)
        try:
            result = loop.run(state, setup.update, batches, to_device=to_device, checkpointer=ckpt, logger=logger,
                              total_steps=total, start_step=start)
        finally:
            logger.close()
        final_loss = result.last_train.get("loss")
    else:
        final_loss = None
    ckpt.close()
    return {"sentences": n, "steps": total, "start_step": start, "seconds": round(time.perf_counter() - t0, 2),
            **({"final_loss": final_loss} if final_loss is not None else {})}


def parallel_batch(mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    from jaxgist.data import pipeline

    return pipeline.to_global(batch, mesh, parallel.DATA_AXES)


def initialized_generator(config, workdir, prefix_dim: int, vocab_size: int):
    """The generator of the initialization stage's last checkpoint."""
    directory = files.path(workdir) / "initialize" / "checkpoints"
    abstract = make_generator(config, prefix_dim, vocab_size, seed=config.seed, abstract=True)
    ckpt = checkpoint.Checkpointer(directory, async_save=False, read_only=True)
    try:
        step = ckpt.saved_step(-1)
        mesh = parallel.make_mesh(config.mesh)
        tx, schedule = optim.make(config.initialize.optim, nnx.state(abstract, nnx.Param), 1)
        layout = cgtgan_step.build_initialization(mesh, abstract, tx, schedule, rules=config.sharding.rules).layout
        models = ckpt.restore_models(step, {GENERATOR: layout.abstract.models[GENERATOR]})
    finally:
        ckpt.close()
    return nnx.merge(layout.graphdefs[GENERATOR], models[GENERATOR])


# ---------------------------------------------------------------------------------------------
# Captioning and scoring
# ---------------------------------------------------------------------------------------------

def greedy_captions(generator, gpt_tok, image_embeds: np.ndarray, *, batch: int, max_tokens: int) -> list[str]:
    """Greedy captions of CLIP image embeddings [N, E], in order."""
    out = []
    generator.eval()
    stop = gpt_tok.stop_id if gpt_tok.stop_id is not None else 13
    for start in range(0, len(image_embeds), batch):
        chunk = image_embeds[start:start + batch]
        padded = np.zeros((batch, chunk.shape[1]), np.float32)
        padded[:len(chunk)] = chunk
        padded[len(chunk):] = chunk[:1]
        dec = generator.greedy(jnp.asarray(padded), max_new_tokens=max_tokens, stop_id=stop, pad_id=gpt_tok.eos_id)
        out.extend(gpt_tok.decode(np.asarray(dec.tokens)[:len(chunk)]))
    return [c.strip() for c in out]


def score_split(generator, gpt_tok, images, store, *, batch: int, max_tokens: int, metrics) -> tuple[dict, dict]:
    """(metrics, {image id: caption}) of the greedy captions of ``images``."""
    keys = [str(im.image_id) for im in images if str(im.image_id) in store.rows]
    refs = {str(im.image_id): list(im.captions) for im in images}
    caps = greedy_captions(generator, gpt_tok, _rows(store, keys), batch=batch, max_tokens=max_tokens)
    predictions = dict(zip(keys, caps))
    scores = caption_metrics.score_captions({k: refs[k] for k in keys}, predictions, metrics=tuple(metrics))
    return scores, predictions


def _numbers(scores: dict) -> dict[str, float]:
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "num_images"}


# ---------------------------------------------------------------------------------------------
# Adversarial training
# ---------------------------------------------------------------------------------------------

def _rewards(config) -> cgtgan_step.Rewards:
    g = config.cgtgan
    return cgtgan_step.Rewards(cos_weight=g.cos_weight, clip_weight=g.clip_weight, reward_weight=g.reward_weight,
                               gan_steps=g.gan_steps, gan_warm_steps=g.gan_warm_steps,
                               normalize_prefix=config.generator.normalize_prefix, temperature=g.temperature,
                               top_k=g.top_k, top_p=g.top_p)


def _wrap(caption: str) -> str:
    """The reference's ``_wrap_sentence``: stripped, one final "." removed (CLIP's input)."""
    r = caption.strip()
    return r[:-1] if r.endswith(".") else r


class Adversarial:
    """Everything the adversarial stage needs: models' layout, data, tokenizers, the host-side step."""

    def __init__(self, config, workdir, total: int | None = None):
        self.config = config
        self.workdir = files.path(workdir)
        g = config.cgtgan
        self.k, self.max_tokens, self.disc_length = g.samples, g.max_tokens, g.max_tokens + 2
        self.texts = _read_corpus_file(self.workdir)
        self.gpt_tok, self.rob_tok = load_tokenizers(config, self.workdir, self.texts)
        self.clip_tok = clip_tokenizer.load(config.clip.tokenizer or None)
        self.images = {s: embedding_store.EmbeddingStore(_store(self.workdir, f"images_{s}")) for s in
                       ("train", "val", "test")}
        targets = embedding_store.EmbeddingStore(_store(self.workdir, "targets"))
        self.train_keys = list(targets.keys)
        self.train_embeds = _rows(self.images["train"], self.train_keys)
        self.targets = _rows(targets, self.train_keys)
        self.prefix_dim = self.train_embeds.shape[1]
        self.real_ids, self.real_mask = self.rob_tok.pad(self.texts, self.disc_length)
        self.mesh = parallel.make_mesh(config.mesh)
        b = config.train.global_batch
        self.batches = StepBatches(len(self.train_keys), b, config.seed)
        self.total = total if total is not None else _total(config.train, self.batches.per_epoch)
        abstract_g = make_generator(config, self.prefix_dim, self.gpt_tok.vocab_size, seed=config.seed, abstract=True)
        _check_vocab(abstract_g.gpt.config.vocab_size, self.gpt_tok, "GPT-2")
        self.clip_model = clip.text_only(clip.from_config(clip_config(config, self.workdir), seed=config.seed))
        if self.clip_model.config.embed_dim != self.prefix_dim:
            raise ValueError(f"config.clip embeds in {self.clip_model.config.embed_dim} dimensions but the stored "
                             f"image embeddings have {self.prefix_dim}: prepare them with the same CLIP")
        disc = make_discriminator(config, self.rob_tok.vocab_size, self.rob_tok.pad_id, seed=config.seed + 7)
        _check_vocab(disc.text_encoder.config.vocab_size, self.rob_tok, "RoBERTa")
        self._disc = disc
        abstract = {GENERATOR: abstract_g, DISCRIMINATOR: nnx.eval_shape(lambda: disc),
                    CLIP: nnx.eval_shape(lambda: self.clip_model)}
        txs, schedules = {}, {}
        d_optim = ml_collections.ConfigDict(config.optim.to_dict())
        d_optim.warmup_steps = config.discriminator_warmup_steps
        for name, c in ((GENERATOR, config.optim), (DISCRIMINATOR, d_optim)):
            txs[name], schedules[name] = optim.make(c, nnx.state(abstract[name], nnx.Param), self.total)
        self.setup = cgtgan_step.build_adversarial(self.mesh, abstract, txs, schedules, _rewards(config),
                                                   rules=config.sharding.rules, seed=config.seed)
        self.key = jax.random.key(config.seed + 1)

    def init_state(self):
        gen = initialized_generator(self.config, self.workdir, self.prefix_dim, self.gpt_tok.vocab_size)
        return self.setup.layout.init({GENERATOR: gen, DISCRIMINATOR: self._disc, CLIP: self.clip_model})

    def clip_ids(self, texts) -> np.ndarray:
        """CLIP ids of the captions (final "." removed), ``cgtgan.clip_context`` long (a longer caption
        keeps its end token last, as ``clip.tokenize(truncate=True)``)."""
        return np.asarray(self.clip_tok([_wrap(t) for t in texts], context_length=self.config.cgtgan.clip_context),
                          np.int32)

    def host_batch(self, state, item) -> dict[str, jax.Array]:
        """Decodes the greedy and K sampled captions of the batch's images with the current generator and
        re-tokenizes them for CLIP and RoBERTa (module docstring of ``cgtgan_step``)."""
        position, rows = item
        rows = np.sort(rows)
        b, k = len(rows), self.k
        image_embeds = self.train_embeds[rows]
        t0 = time.perf_counter()
        gen = self.setup.layout.merge(state, GENERATOR)
        gen.eval()
        stop = self.gpt_tok.stop_id if self.gpt_tok.stop_id is not None else 13
        pad = self.gpt_tok.eos_id
        x = jnp.asarray(image_embeds)
        greedy = gen.greedy(x, max_new_tokens=self.max_tokens, stop_id=stop, pad_id=pad)
        g = self.config.cgtgan
        sampled = gen.sample(x, jax.random.fold_in(self.key, position), num_samples=k, temperature=g.temperature,
                             top_k=g.top_k, top_p=g.top_p, dropout=g.sample_dropout, max_new_tokens=self.max_tokens,
                             stop_id=stop, pad_id=pad)
        greedy_tokens, sample_tokens = np.asarray(greedy.tokens), np.asarray(sampled.tokens)  # waits for decoding
        t1 = time.perf_counter()
        greedy_text = self.gpt_tok.decode(greedy_tokens)
        sample_text = self.gpt_tok.decode(sample_tokens.reshape(b * k, -1))
        texts = []
        for i in range(b):
            texts.extend(sample_text[i * k:(i + 1) * k] + [greedy_text[i]])
        fake_ids, fake_mask = self.rob_tok.pad(texts, self.disc_length)
        m = len(self.texts)
        real = np.asarray([(position * b * k + j) % m for j in range(b * k)])
        perm_round = (position * b * k) // m
        order = np.random.default_rng([self.config.seed, 10_000 + perm_round]).permutation(m)
        real = order[real]
        batch = {
            "image_embeds": image_embeds, "targets": self.targets[rows],
            "sampled": np.asarray(sampled.sampled, np.int32), "lengths": np.asarray(sampled.lengths, np.int32),
            "clip_ids": self.clip_ids(texts).reshape(b, k + 1, -1),
            "fake_ids": fake_ids.reshape(b, k + 1, -1), "fake_mask": fake_mask.reshape(b, k + 1, -1),
            "real_ids": self.real_ids[real].reshape(b, k, -1), "real_mask": self.real_mask[real].reshape(b, k, -1),
        }
        self.host_seconds = {"decode_s": t1 - t0, "retokenize_s": time.perf_counter() - t1}
        return parallel_batch(self.mesh, batch)

    def step(self, state, item):
        """Decoding and re-tokenization on the host, then the jitted update; the host's two times are
        logged as ``decode_s`` and ``retokenize_s`` beside the step's metrics."""
        state, metrics = self.setup.update(state, self.host_batch(state, item))
        return state, {**metrics, **self.host_seconds}


def _val_images(config, workdir):
    return {s: split_images(config, workdir, s) for s in ("val", "test")}


def train(config, workdir) -> dict:
    """Prepares and initializes what is missing, trains adversarially, then scores the test split."""
    t_start = time.perf_counter()
    if not _prepared(config, workdir):
        prepare(config, workdir)
    initialize(config, workdir)  # trains, resumes, or finds the initialized generator saved
    workdir = files.path(workdir)
    adv = Adversarial(config, workdir)
    split_imgs = _val_images(config, workdir)
    per_epoch = adv.batches.per_epoch
    ev = config.evaluate
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=per_epoch * config.train.eval_every_epochs,
                                   keep=config.train.keep, best_metric="CIDEr", async_save=config.train.async_checkpoints)

    def evaluate(state) -> dict[str, float]:
        gen = adv.setup.layout.merge(state, GENERATOR)
        scores, _ = score_split(gen, adv.gpt_tok, split_imgs["val"], adv.images["val"], batch=ev.batch,
                                max_tokens=adv.max_tokens, metrics=ev.val_metrics)
        return _numbers(scores)

    state, start = loop.restore_or_init(ckpt, adv.setup.abstract_state, adv.init_state, adv.batches)
    logging.info("cgtgan: %d train images, %d corpus sentences, %d steps (%d per epoch) of %d images x %d samples, "
                 "mesh %s", len(adv.train_keys), len(adv.texts), adv.total, per_epoch, config.train.global_batch,
                 adv.k, dict(adv.mesh.shape))
    if start < adv.total:
        logger = metrics_lib.MetricsLogger(workdir, total_steps=adv.total, global_batch=config.train.global_batch,
                                           log_every=config.train.log_every, resume_step=start if start else None)
        try:
            result = loop.run(state, adv.step, adv.batches, to_device=lambda item: item, checkpointer=ckpt,
                              logger=logger, total_steps=adv.total, start_step=start,
                              eval_every=per_epoch * config.train.eval_every_epochs, evaluate=evaluate)
        finally:
            logger.close()
        state, last_train = result.state, result.last_train
    else:
        last_train = {}
    best = ckpt.best_step()
    best = best if best is not None else ckpt.latest_step()
    best_models = ckpt.restore_models(best, {GENERATOR: adv.setup.abstract_state.models[GENERATOR]})
    ckpt.close()
    table, examples = {}, {}
    for name, gen in (("initialized", initialized_generator(config, workdir, adv.prefix_dim, adv.gpt_tok.vocab_size)),
                      ("adversarial", nnx.merge(adv.setup.layout.graphdefs[GENERATOR], best_models[GENERATOR]))):
        row = {}
        for split in ("val", "test"):
            scores, preds = score_split(gen, adv.gpt_tok, split_imgs[split], adv.images[split], batch=ev.batch,
                                        max_tokens=adv.max_tokens,
                                        metrics=ev.metrics if split == "test" else ev.val_metrics)
            row.update({f"{split}_{k}": v for k, v in _numbers(scores).items()})
            for metric, reason in scores.get("skipped", {}).items():
                logging.info("cgtgan: %s skipped on %s: %s", metric, split, reason)
            if jax.process_index() == 0:
                caption_metrics.write_coco_results(workdir / "captions" / f"{name}_{split}.json", preds)
            if split == "test":
                examples[name] = preds
        if name == "adversarial":
            row["step"] = float(best)
            row["epoch"] = best / per_epoch
        table[name] = row
    host = [r for r in metrics_lib.read_jsonl(files.join(workdir, "metrics.jsonl")) if "train/retokenize_s" in r]
    timing = {f"mean_{k}": round(float(np.mean([r[f"train/{k}"] for r in host])), 4)
              for k in ("decode_s", "retokenize_s", "step_time_s")} if host else {}
    out = {"steps": adv.total, "steps_per_epoch": per_epoch, "start_step": start, "best_step": best, **timing,
           "train_images": len(adv.train_keys), "corpus_sentences": len(adv.texts),
           "seconds": round(time.perf_counter() - t_start, 2),
           **({"final_loss": last_train["loss"]} if "loss" in last_train else {})}
    if jax.process_index() == 0:
        _write_examples(workdir, split_imgs["test"], examples, ev.examples)
        results.write(workdir, config.method, {"CgT-GAN": table}, run=out)
    return {config.method: {"CgT-GAN": table, "run": out}}


def _write_examples(workdir, images, captions_by_model: dict, count: int) -> None:
    """``captions/examples.md``: the first ``count`` test images beside each model's caption and a reference."""
    lines = ["# Example test captions", "", "| image | " + " | ".join(captions_by_model) + " | a reference |",
             "|---|" + "---|" * (len(captions_by_model) + 1)]
    base = os.path.join(os.fspath(workdir), "captions")
    for im in images[:count]:
        key = str(im.image_id)
        rel = os.path.relpath(im.path, base)
        cells = [captions_by_model[m].get(key, "") for m in captions_by_model]
        lines.append(f"| ![{key}]({rel}) | " + " | ".join(cells) + f" | {im.captions[0] if im.captions else ''} |")
    files.makedirs(base)
    with open(os.path.join(base, "examples.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def evaluate_checkpoint(config, workdir) -> dict:
    """Metrics of a saved step (``evaluate.step``; -1: the best by val CIDEr) on val and test."""
    workdir = files.path(workdir)
    adv = Adversarial(config, workdir, total=1)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False, read_only=True, best_metric="CIDEr")
    try:
        step = config.evaluate.step
        if step == -1:
            step = ckpt.best_step() or ckpt.latest_step()
        step = ckpt.saved_step(step)
        models = ckpt.restore_models(step, {GENERATOR: adv.setup.abstract_state.models[GENERATOR]})
    finally:
        ckpt.close()
    gen = nnx.merge(adv.setup.layout.graphdefs[GENERATOR], models[GENERATOR])
    row = {}
    for split, imgs in _val_images(config, workdir).items():
        scores, preds = score_split(gen, adv.gpt_tok, imgs, adv.images[split], batch=config.evaluate.batch,
                                    max_tokens=adv.max_tokens, metrics=config.evaluate.metrics)
        row.update({f"{split}_{k}": v for k, v in _numbers(scores).items()})
        if jax.process_index() == 0:
            caption_metrics.write_coco_results(workdir / "captions" / f"step_{step}_{split}.json", preds)
    table = {f"step_{step}": row}
    if jax.process_index() == 0:
        results.write(workdir, config.method, {"CgT-GAN": table})
    return {config.method: {"CgT-GAN": table}}


