"""The text a run leaned on, next to its images: thumbnails of training images with their matched
descriptions (and cosines), and for captioning runs the generated captions beside the references.

    g = gallery.matched(run, limit=24)      # Gallery(title, source, items, total, note) or None
    for item in g.items:
        item.thumbnail                      # "data:image/jpeg;base64,..." (None if the image is missing)
        item.texts                          # [(description, cosine or None), ...], best first

Images are chosen one per class in turn (class order, then file order), up to ``limit``, so a
CUB-size run gives a page of a few dozen thumbnails, not thousands.

Files read (all optional; a missing one means no gallery, with a note saying why):
- matched captions: ``match/captions_top{k}.json`` (GIST's match stage), ``captions_top{k}.json`` (the
  caption-matching job), else the config's ``data.captions``; cosines from the ``.scores.json`` beside it;
- images and classes: the config's ``data.metadata`` and ``data.image_dir`` (synthetic data: the dataset
  the job generated, ``data.synthetic.dir`` or ``<workdir>/synthetic``);
- generated captions: ``captions_generated.json`` (``{filename: {"generated": str, "references": [str]}}``,
  the captioning runs' output) or ``describe/image_descriptions.json`` (``{filename: description}``, the
  references then being the data's captions).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from typing import Any

from jaxgist.core import files
from jaxgist.data import sources
from jaxgist.methods import caption_matching
from jaxgist.reports.runs import Run

GENERATED = "captions_generated.json"
IMAGE_DESCRIPTIONS = os.path.join("describe", "image_descriptions.json")


@dataclasses.dataclass
class Item:
    filename: str
    label: str  # the class name
    thumbnail: str | None  # data URI
    texts: list[tuple[str, float | None]] = dataclasses.field(default_factory=list)  # matched: (caption, cosine)
    generated: list[str] = dataclasses.field(default_factory=list)
    references: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Gallery:
    title: str
    source: str  # the file the texts come from
    items: list[Item]
    total: int  # images with texts in that file
    note: str = ""


def thumbnail(path: str, size: int = 112) -> str | None:
    """A JPEG thumbnail (longest side ``size``, never enlarged) of the image at ``path`` as a data URI;
    None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with files.path(path).open("rb") as f, Image.open(f) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=82)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def data_files(run: Run) -> dict[str, str]:
    """metadata / image_dir / captions of the run's data (from its config.json; "" where unknown)."""
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    if data.get("source") == "synthetic":
        s = data.get("synthetic") if isinstance(data.get("synthetic"), dict) else {}
        root = s.get("dir") or os.path.join(run.path, "synthetic")
        captions = os.path.join(root, f"captions_top{s.get('num_captions', 5)}.json")
        if not files.exists(captions):  # the dataset's own file, whatever its count
            found = sorted(files.path(root).glob("captions_top*.json")) if files.exists(root) else []
            captions = os.fspath(found[0]) if found else captions
        return {"metadata": os.path.join(root, "metadata.csv"), "image_dir": os.path.join(root, "images"),
                "captions": captions}
    if data.get("source") == "gist":
        return {k: str(data.get(k) or "") for k in ("metadata", "image_dir", "captions")}
    return {"metadata": "", "image_dir": "", "captions": ""}


def _read_object(path: str, what: str) -> dict:
    try:
        data = json.loads(files.read_text(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def matched_captions_file(run: Run) -> tuple[str, str]:
    """(path, what) of the captions the run's fine-tuning leaned on; ("", "") when there are none."""
    for folder in ("match", ""):
        base = files.join(run.path, folder) if folder else files.path(run.path)
        if base.is_dir():
            found = sorted(base.glob("captions_top*.json"), key=lambda p: p.name)
            found = [p for p in found if not p.name.endswith(".scores.json")]
            if found:
                return os.fspath(found[0]), "matched descriptions"
    captions = data_files(run)["captions"]
    if captions and files.exists(captions):
        return captions, "captions of the data (data.captions)"
    return "", ""


def _rows(run: Run, note: list[str]) -> list[sources.MetadataRow]:
    paths = data_files(run)
    if not paths["metadata"]:
        note.append("images are not shown: the run's data is not a metadata CSV with image files")
        return []
    if not files.exists(paths["metadata"]):
        note.append(f"images are not shown: {paths['metadata']} does not exist here")
        return []
    try:
        return sources.read_metadata(paths["metadata"])
    except sources.DataError as e:
        note.append(f"images are not shown: {e}")
        return []


def _pick(names: list[str], label_of: dict[str, int], limit: int) -> list[str]:
    """Up to ``limit`` of ``names``, one per class in turn."""
    by_class: dict[int, list[str]] = {}
    for name in names:
        by_class.setdefault(label_of.get(name, -1), []).append(name)
    queues = [by_class[k] for k in sorted(by_class)]
    out: list[str] = []
    depth = 0
    while len(out) < limit and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][:limit - len(out)]
        depth += 1
    return out


def _item_images(run: Run, names: list[str], limit: int, size: int, note: list[str]):
    """(chosen names, {name: (class name, thumbnail)})."""
    rows = _rows(run, note)
    image_dir = data_files(run)["image_dir"]
    label_of = {r.filename: r.label for r in rows}
    species = {r.filename: r.species for r in rows}
    chosen = _pick(names, label_of, limit)
    shown = {}
    missing = 0
    for name in chosen:
        thumb = thumbnail(os.path.join(image_dir, name), size) if image_dir and name in species else None
        missing += thumb is None and bool(rows)
        shown[name] = (species.get(name, ""), thumb)
    if missing:
        note.append(f"{missing} image(s) could not be read under {image_dir}")
    return chosen, shown


def matched(run: Run, limit: int = 24, size: int = 112) -> Gallery | None:
    """Training images with their matched descriptions (and cosines where the match stage wrote them)."""
    path, what = matched_captions_file(run)
    if not path:
        return None
    note: list[str] = []
    captions = _read_object(path, "captions (filename -> list of captions)")
    try:
        scores = caption_matching.read_scores(caption_matching.scores_path(path))
    except sources.DataError as e:
        scores = {}
        note.append(str(e))
    chosen, shown = _item_images(run, list(captions), limit, size, note)
    items = []
    for name in chosen:
        texts = captions[name] if isinstance(captions[name], list) else [str(captions[name])]
        cos = scores.get(name, [])
        label, thumb = shown[name]
        items.append(Item(filename=name, label=label, thumbnail=thumb,
                          texts=[(str(t), float(cos[i]) if i < len(cos) else None) for i, t in enumerate(texts)]))
    if not scores:
        note.append("no cosines: the captions were not matched in this workdir")
    return Gallery(title=f"{what}: {len(items)} of {len(captions)} training images", source=path, items=items,
                   total=len(captions), note="; ".join(note))


def _generated(run: Run) -> tuple[str, dict[str, dict[str, Any]]]:
    path = os.fspath(files.join(run.path, GENERATED))
    if files.exists(path):
        data = _read_object(path, 'generated captions (filename -> {"generated": ..., "references": [...]})')
        out = {}
        for name, entry in data.items():
            if not isinstance(entry, dict) or "generated" not in entry:
                raise ValueError(f'{path}: entry {name!r} must be an object with "generated" (and "references")')
            out[name] = entry
        return path, out
    path = os.fspath(files.join(run.path, IMAGE_DESCRIPTIONS))
    if files.exists(path):
        described = _read_object(path, "image descriptions (filename -> description)")
        references = data_files(run)["captions"]
        refs = _read_object(references, "captions") if references and files.exists(references) else {}
        return path, {name: {"generated": text, "references": refs.get(name, [])} for name, text in described.items()}
    return "", {}


def captioning(run: Run, limit: int = 24, size: int = 112) -> Gallery | None:
    """Images with their generated captions beside the reference captions."""
    path, entries = _generated(run)
    if not path:
        return None
    note: list[str] = []
    chosen, shown = _item_images(run, list(entries), limit, size, note)

    def strings(value) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    items = [Item(filename=name, label=shown[name][0], thumbnail=shown[name][1],
                  generated=strings(entries[name]["generated"]), references=strings(entries[name].get("references", [])))
             for name in chosen]
    return Gallery(title=f"generated captions: {len(items)} of {len(entries)} images", source=path, items=items,
                   total=len(entries), note="; ".join(note))
