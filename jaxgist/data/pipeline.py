"""grain input pipelines: image/caption pairs for contrastive training, image/label batches for
evaluation, and their assembly into global ``jax.Array``s.

Order: pair -> shuffle -> repeat -> decode and augment (lazy, seeded by the position in the global
stream) -> shard by process -> batch -> (multiprocess) prefetch. Everything before the map is
index arithmetic, so the pipeline is deterministic given the seed and its iterator state
(``get_state``/``set_state``) resumes exactly.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np
from absl import flags, logging

from jaxgist.data import augment, images, transforms

DEFAULT_TEMPLATE = "{species}: {caption}"


class PairedCaptions:
    """Random-access view in which each image appears ``num_captions`` times, once with each of its
    first ``num_captions`` matched captions, as ``text = template.format(species=..., caption=...)``.

    Item ``i`` is image ``i // num_captions`` with caption ``i % num_captions``.
    """

    def __init__(self, source, num_captions: int, template: str = DEFAULT_TEMPLATE):
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        if "{caption}" not in template:
            raise ValueError(f"caption template {template!r} has no '{{caption}}' field")
        self.source, self.num_captions, self.template = source, num_captions, template

    def __len__(self) -> int:
        return len(self.source) * self.num_captions

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self.source[index // self.num_captions])
        captions = record.get("captions")
        if captions is None:
            raise KeyError(f"record {record.get('filename')!r} has no captions (load the source with a captions file)")
        which = index % self.num_captions
        if which >= len(captions):
            raise ValueError(f"{record.get('filename')!r} has {len(captions)} captions, "
                             f"fewer than num_captions={self.num_captions}")
        record["text"] = self.template.format(species=record.get("species", ""), caption=captions[which])
        record["caption_index"] = which
        return record


def _shard(ds: grain.MapDataset, shard_index: int | None, shard_count: int | None) -> grain.MapDataset:
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside [0, {count})")
    return ds[index::count] if count > 1 else ds


def _per_process_batch(global_batch: int, shard_count: int | None) -> int:
    count = jax.process_count() if shard_count is None else shard_count
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not divisible by the {count} processes")
    return global_batch // count


class _TrainExample:
    """Decode, augment and tokenize one pair (a picklable callable, for grain worker processes)."""

    def __init__(self, image_size: int, tokenize: Callable[[Sequence[str]], np.ndarray], num_captions: int,
                 skip_unreadable: bool):
        self.image_size, self.tokenize, self.skip_unreadable = image_size, tokenize, skip_unreadable
        self.num_captions = num_captions

    def __call__(self, record, rng: np.random.Generator):
        image = _read(record, self.skip_unreadable)
        if image is None:
            return None
        return {
            "image": transforms.train_preprocess(image, self.image_size, rng),
            "ids": self.tokenize([record["text"]])[0],
            "label": np.int32(record["label"]),
            # which (image, caption) pair this is: image index * num_captions + caption index
            "pair": np.int64(record["index"] * self.num_captions + record["caption_index"]),
        }


class _ClassifierTrainExample:
    """Decode and augment one record for an ImageNet-style classifier (``transforms.classifier_train_preprocess``:
    crop, flip, optional RandAugment and random erasing), with its ``text_embedding`` when the record has one."""

    def __init__(self, image_size: int, skip_unreadable: bool, interpolation: str = "bilinear",
                 randaugment: str = "", erasing_prob: float = 0.0):
        self.image_size, self.skip_unreadable = image_size, skip_unreadable
        self.interpolation, self.erasing_prob = interpolation, erasing_prob
        self.randaugment = (augment.RandAugment.parse(randaugment, fill=transforms.IMAGENET_FILL, interpolation=interpolation)
                            if randaugment else None)

    def __call__(self, record, rng: np.random.Generator):
        image = _read(record, self.skip_unreadable)
        if image is None:
            return None
        out = {"image": transforms.classifier_train_preprocess(
                   image, self.image_size, rng, interpolation=self.interpolation, randaugment=self.randaugment,
                   erasing_prob=self.erasing_prob),
               "label": np.int32(record["label"])}
        if "text_embedding" in record:
            out["text_embedding"] = np.asarray(record["text_embedding"], np.float32)
        return out


class _RepeatedAugmentation(grain.MapDataset):
    """DeiT's repeated augmentation (its ``RASampler``) as index arithmetic over an endless reshuffled
    dataset: epoch ``e`` is ``epoch_length`` positions, position ``p`` holding record ``perm_e[p // repeats]``,
    so each record drawn appears ``repeats`` times in a row (augmented independently downstream, and in
    one global batch, as the sampler's per-GPU slices of consecutive copies are) and an epoch still has
    ``epoch_length`` examples: about ``1 / repeats`` of the records, each ``repeats`` times."""

    def __init__(self, parent: grain.MapDataset, num_records: int, repeats: int, epoch_length: int):
        super().__init__(parent)
        self._num_records, self._repeats, self._epoch_length = num_records, repeats, epoch_length

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"RepeatedAugmentation(repeats={self._repeats}, epoch_length={self._epoch_length})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._epoch_length)
        return self._parent[epoch * self._num_records + position // self._repeats]


class _EvalExample:
    """Decode and preprocess one record for evaluation: CLIP's preprocessing under ``crop_rounding``'s rule
    (``transforms``; the image is read in its stored mode: torchvision's rule resizes it so, HF's converts it
    to RGB first), or with ``preprocess="imagenet"`` a classifier's resize / center crop / ImageNet
    normalization (``transforms.classifier_eval_preprocess``)."""

    def __init__(self, image_size: int, skip_unreadable: bool, crop_rounding: str = "torchvision",
                 preprocess: str = "clip", resize: int | None = None, interpolation: str = "bilinear"):
        self.image_size, self.skip_unreadable = image_size, skip_unreadable
        self.crop_rounding, self.preprocess, self.resize = crop_rounding, preprocess, resize
        self.interpolation = interpolation

    def __call__(self, record):
        image = _read(record, self.skip_unreadable, in_stored_mode=True)
        if image is None:
            return None
        if self.preprocess == "imagenet":
            pixels = transforms.classifier_eval_preprocess(image, self.image_size, self.resize, self.interpolation)
        else:
            pixels = transforms.clip_eval_preprocess(image, self.image_size, self.crop_rounding)
        return {"image": pixels, "label": np.int32(record["label"]), "index": np.int64(record["index"])}


class _AugmentedExample:
    """An evaluation record under training augmentation (random resized crop with ``scale``, flip)."""

    def __init__(self, image_size: int, scale: tuple[float, float], skip_unreadable: bool):
        self.image_size, self.scale, self.skip_unreadable = image_size, tuple(scale), skip_unreadable

    def __call__(self, record, rng: np.random.Generator):
        image = _read(record, self.skip_unreadable)
        if image is None:
            return None
        crop = transforms.random_resized_crop_flip(image, self.image_size, rng, scale=self.scale)
        return {"image": transforms.normalize(crop), "label": np.int32(record["label"]),
                "index": np.int64(record["index"])}


_SKIPPED_KEY = "_skipped_paths"
_skipped: list[str] = []  # paths skipped as unreadable, as the main process learns of them
_pending: list[str] = []  # paths this process skipped and has not yet attached to a batch
_pending_lock = threading.Lock()


def _read(record, skip_unreadable: bool, in_stored_mode: bool = False):
    """The record's image as uint8 RGB (with ``in_stored_mode``: a PIL image in the file's own mode):
    decoded from ``record["image_bytes"]`` when the source holds encoded images (TFDS), read from
    ``record["path"]`` otherwise."""
    try:
        if "image_bytes" in record:
            decode = images.decode_pil_image if in_stored_mode else images.decode_image
            return decode(record["image_bytes"], name=str(record.get("path", record.get("filename"))))
        return images.load_pil_image(record["path"]) if in_stored_mode else images.load_image(record["path"])
    except (FileNotFoundError, images.ImageReadError) as e:
        if not skip_unreadable:
            raise images.with_skip_hint(e) from e
        with _pending_lock:
            _pending.append(str(record.get("path", record.get("filename"))))
        logging.warning("skipping unreadable image: %s", e)
        return None


def _attach_skipped(batch: dict) -> dict:
    """Runs where the batch is made (a worker process or this one): hands the paths skipped since the
    last batch to the main process inside the batch."""
    with _pending_lock:
        paths, _pending[:] = list(_pending), []
    return {**batch, _SKIPPED_KEY: np.asarray(paths, dtype=np.str_)}


def _record_skipped(batch: dict) -> dict:
    """Runs in the main process: counts the skipped paths a batch carries and removes them from it."""
    batch = dict(batch)
    paths = [str(p) for p in batch.pop(_SKIPPED_KEY)]
    if paths:
        _skipped.extend(paths)
        logging.warning("%d unreadable image(s) skipped so far in this process's input, e.g. %s", len(_skipped),
                        paths[0])
    return batch


def skipped_images() -> list[str]:
    """Paths skipped as unreadable (``skip_unreadable=True``) in this process's input, including those
    skipped in its grain worker processes (reported with the batches that follow them)."""
    return list(_skipped)


def _is_present(example) -> bool:
    return example is not None


def _finish(ds: grain.MapDataset, batch_size: int, *, drop_remainder: bool, skip_unreadable: bool,
            workers: int, prefetch: int) -> grain.IterDataset:
    # Decode and augment `prefetch` batches' worth of examples ahead in 2 threads (PIL and numpy release
    # the GIL), in the main process or in each worker; with workers, each also keeps `prefetch`
    # whole batches ready.
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch * batch_size)
    it = ds.to_iter_dataset(read)
    if skip_unreadable:
        it = it.filter(_is_present)
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    if skip_unreadable:
        it = it.map(_attach_skipped)
    if workers:
        if not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; outside absl.app (notebooks, other CLIs)
            # nothing has parsed them, so take the defaults.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
    if skip_unreadable:
        it = it.map(_record_skipped)
    return it


def train_dataset(
    source,
    *,
    image_size: int,
    tokenize: Callable[[Sequence[str]], np.ndarray],
    global_batch: int,
    num_captions: int,
    template: str = DEFAULT_TEMPLATE,
    seed: int = 0,
    num_epochs: int | None = None,
    skip_unreadable: bool = False,
    workers: int = 0,
    prefetch: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Batches of {"image" [b, S, S, 3] float32, "ids" [b, L] int32, "label" [b] int32} for this process
    (b = global_batch / process count). ``num_epochs=None`` repeats forever. ``iter()`` of the result
    has ``get_state``/``set_state``; ``workers`` > 0 decodes in that many processes."""
    ds = grain.MapDataset.source(PairedCaptions(source, num_captions, template))
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    # Seeded by the position in the global stream (the map is lazy, so sharding after it costs
    # nothing): a pair gets the same augmentation whatever the number of processes.
    ds = ds.random_map(_TrainExample(image_size, tokenize, num_captions, skip_unreadable), seed=seed)
    ds = _shard(ds, shard_index, shard_count)
    return _finish(ds, _per_process_batch(global_batch, shard_count), drop_remainder=True,
                   skip_unreadable=skip_unreadable, workers=workers, prefetch=prefetch)


def classifier_train_dataset(
    source,
    *,
    image_size: int,
    global_batch: int,
    seed: int = 0,
    interpolation: str = "bilinear",
    randaugment: str = "",
    erasing_prob: float = 0.0,
    repeats: int = 1,
    skip_unreadable: bool = False,
    workers: int = 0,
    prefetch: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Endless batches of {"image" [b, S, S, 3] float32 (ImageNet-normalized), "label" [b] int32, and
    "text_embedding" [b, D] float32 when the source's records carry one} for this process (b = global
    batch / process count): reshuffled every epoch, each image augmented (``transforms.
    classifier_train_preprocess``: crop and flip with ``interpolation``, timm's RandAugment string
    ``randaugment`` when set, random erasing with ``erasing_prob``) seeded by its position in the global
    stream. ``repeats`` > 1: DeiT's repeated augmentation (``_RepeatedAugmentation``), an epoch being the
    ``len(source) // global_batch`` full batches. Resumable with ``get_state``/``set_state``."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if interpolation not in transforms.INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {transforms.INTERPOLATIONS}")
    if not 0.0 <= erasing_prob <= 1.0:
        raise ValueError(f"erasing_prob={erasing_prob} must be in [0, 1]")
    example = _ClassifierTrainExample(image_size, skip_unreadable, interpolation, randaugment, erasing_prob)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    if repeats > 1:
        epoch_length = len(source) // global_batch * global_batch
        if epoch_length < 1:
            raise ValueError(f"global batch {global_batch} exceeds the {len(source)} training records")
        ds = _RepeatedAugmentation(ds, len(source), repeats, epoch_length)
    ds = ds.random_map(example, seed=seed)
    ds = _shard(ds, shard_index, shard_count)
    return _finish(ds, _per_process_batch(global_batch, shard_count), drop_remainder=True,
                   skip_unreadable=skip_unreadable, workers=workers, prefetch=prefetch)


def eval_dataset(
    source,
    *,
    image_size: int,
    batch_size: int,
    skip_unreadable: bool = False,
    workers: int = 0,
    prefetch: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    augment_seed: int | None = None,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    crop_rounding: str = "torchvision",
    preprocess: str = "clip",
    resize: int | None = None,
    interpolation: str = "bilinear",
) -> grain.IterDataset:
    """One pass over ``source`` in order: {"image", "label", "index"} batches (the last may be short).

    ``preprocess``: "clip" (CLIP's evaluation preprocessing) or "imagenet" (a classifier's: resize the
    short side to ``resize``, default ``image_size / 0.875``, with ``interpolation``, center crop, ImageNet
    normalization).

    ``crop_rounding``: the evaluation preprocessing's rule, "torchvision" (OpenAI's clip, open_clip) or
    "hf" (``CLIPImageProcessor``), see ``jaxgist.data.transforms``.
    ``augment_seed`` (None: CLIP's evaluation preprocessing) instead draws a random resized crop
    (``crop_scale``) and flip per record, seeded by the seed and the record's position: the augmented
    passes of few-shot caches (Tip-Adapter), one pass per seed.
    """
    transforms.check_crop_rounding(crop_rounding)
    if preprocess not in ("clip", "imagenet"):
        raise ValueError(f"preprocess={preprocess!r} is not 'clip' or 'imagenet'")
    ds = grain.MapDataset.source(source)
    if augment_seed is None:
        ds = ds.map(_EvalExample(image_size, skip_unreadable, crop_rounding, preprocess, resize, interpolation))
    else:
        ds = ds.random_map(_AugmentedExample(image_size, crop_scale, skip_unreadable), seed=augment_seed)
    ds = _shard(ds, shard_index, shard_count)
    return _finish(ds, batch_size, drop_remainder=False, skip_unreadable=skip_unreadable,
                   workers=workers, prefetch=prefetch)


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, data_axes=("data",)) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global arrays sharded over ``data_axes`` on the leading axis."""
    axes = tuple(a for a in data_axes if a in mesh.axis_names)
    spec = jax.sharding.PartitionSpec(axes if axes else None)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
