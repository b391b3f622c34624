"""Procedurally drawn datasets for offline runs and tests: coloured shapes in memory (one (colour, shape)
pair per class), and fine-grained birds written as a GIST-format dataset, read through CUB's code path.

    images, labels, names = synthetic.make_images(num_classes=6, per_class=10, size=32)   # shapes: uint8 [N, S, S, 3]
    ds = synthetic.write_dataset("/tmp/birds", num_classes=20, train_per_class=30)      # SyntheticDataset: paths
    python -m jaxgist.data.synthetic --out /tmp/birds --num_classes 20 --train_per_class 30

Birds (``species_list``, ``render``, ``image_captions``, ``class_descriptions``, ``coder_knowledge``):
a genus fixes every attribute (body shape and colour, pattern and its colour, head, wing/tail, crest and
beak colour, tail length) and its species change one, so species of a genus differ in one or two, often
small parts, those of different genera in several. Images vary by position, scale, rotation, facing,
perch, background colour and texture, lighting, noise and colour jitter. Deterministic: the first ``n``
classes are the same for every ``num_classes >= n``; image ``j`` depends only on (seed, label, split, j).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from jaxgist.data.sources import class_key

# =============================================================================================
# Coloured shapes (in memory)
# =============================================================================================

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")


def class_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` "<colour> <shape>" names."""
    combos = [f"{c} {s}" for s, c in itertools.product(SHAPES, COLOURS)]
    if not 1 <= num_classes <= len(combos):
        raise ValueError(f"num_classes must be in [1, {len(combos)}], got {num_classes}")
    return combos[:num_classes]


def _mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d = dy**2 + dx**2
        return (d <= r**2) & (d >= (0.55 * r) ** 2)
    if shape == "cross":
        return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def draw(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [size, size, 3] image of class ``name`` ("<colour> <shape>")."""
    colour, shape = name.split(" ")
    background = rng.integers(60, 200, size=3)
    img = np.clip(background + rng.normal(0, 18, size=(size, size, 3)), 0, 255)
    r = size * rng.uniform(0.2, 0.32)
    cy, cx = rng.uniform(r, size - r, size=2)
    img[_mask(shape, size, cy, cx, r)] = COLOURS[colour]
    return img.astype(np.uint8)


def make_images(num_classes: int, per_class: int, size: int, seed: int = 0):
    """Returns (uint8 images [N, size, size, 3], int32 labels [N], class names)."""
    names = class_names(num_classes)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    images = np.stack([draw(names[c], size, rng) for c in labels])
    return images, labels, names


# =============================================================================================
# Fine-grained birds: taxonomy
# =============================================================================================

# Named colours of bird parts (RGB). Every colour word a caption or description uses is a key here
# or in BACKGROUNDS.
PALETTE = {
    "red": (205, 35, 35), "orange": (240, 130, 25), "yellow": (240, 210, 40), "green": (45, 150, 60),
    "blue": (40, 80, 210), "purple": (125, 50, 165), "brown": (125, 80, 40), "grey": (135, 135, 135),
    "black": (25, 25, 25), "white": (240, 240, 240),
}
BODY_COLOURS = tuple(PALETTE)
# The colour of stripes, spots or checks on a body of each colour (contrasting).
PATTERN_COLOUR = {"red": "black", "orange": "black", "yellow": "black", "green": "black", "blue": "white",
                  "purple": "white", "brown": "white", "grey": "black", "black": "white", "white": "black"}
BEAK_COLOURS = ("black", "orange", "yellow", "red", "grey")
PATTERNS = ("plain", "striped", "spotted", "checkered")
BODY_SHAPES = ("round", "slender")
TAIL_LENGTHS = ("short", "long")
GENERA = (
    "Finch", "Warbler", "Sparrow", "Tanager", "Wren", "Jay", "Bunting", "Oriole", "Vireo", "Thrush",
    "Grosbeak", "Flycatcher", "Kingbird", "Swallow", "Tern", "Pipit", "Lark", "Shrike", "Nuthatch",
    "Kinglet", "Chickadee", "Titmouse", "Waxwing", "Starling", "Cuckoo", "Kingfisher", "Plover",
    "Sandpiper", "Myna", "Bulbul", "Babbler", "Sunbird", "Weaver", "Manakin", "Trogon", "Motmot",
    "Barbet", "Pitta", "Dipper", "Siskin",
)
# The attributes a species may change relative to its genus (one each).
VARIANT_ATTRIBUTES = ("crest", "wing", "pattern", "beak", "tail", "head")
# Named background colours (RGB) and textures.
BACKGROUNDS = {"leaf green": (95, 140, 75), "sky blue": (135, 175, 220), "sand": (205, 185, 135),
               "stone grey": (120, 122, 125), "bark brown": (115, 90, 65), "pale cream": (230, 225, 205)}
TEXTURES = ("smooth", "mottled", "speckled")

# Attributes counted by `attribute_distance` (the pattern colour follows from the body colour).
DISTANCE_ATTRIBUTES = ("body_shape", "body_colour", "pattern", "head_colour", "wing_colour", "crest",
                       "beak_colour", "tail")
# Common species of two genera differ in at least this many attributes, so species of different
# genera (each at most one change away from its common species) differ in at least two.
MIN_GENUS_DISTANCE = 4
_TAXONOMY_SEED = 2011  # fixes the genus attributes; not the dataset seed, so names never change


@dataclasses.dataclass(frozen=True)
class Species:
    """One class of bird: its name and the attributes every image of it shows.

    ``crest`` is a colour name or None (no crest). ``distinguishing`` names the attributes (from
    VARIANT_ATTRIBUTES) in which the species departs from its genus; empty for the genus's common
    species.
    """

    name: str
    genus: str
    body_shape: str
    body_colour: str
    pattern: str
    pattern_colour: str
    head_colour: str
    wing_colour: str
    crest: str | None
    beak_colour: str
    tail: str
    distinguishing: tuple[str, ...] = ()

    def attributes(self) -> dict[str, Any]:
        """The visual attributes as a plain dict (no name, genus or ``distinguishing``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "genus", "distinguishing")}


def _other(rng: np.random.Generator, options: Sequence[str], *exclude: str | None) -> str:
    return str(rng.choice([o for o in options if o not in exclude]))


def attribute_distance(a: Species, b: Species) -> int:
    """How many visible attributes two species differ in (DISTANCE_ATTRIBUTES)."""
    return sum(getattr(a, k) != getattr(b, k) for k in DISTANCE_ATTRIBUTES)


def _genus_base(genus: str, rng: np.random.Generator, earlier: Sequence[Species]) -> Species:
    """A genus's common species, drawn until it differs from every earlier genus's common species
    in body colour, shape or pattern and in at least MIN_GENUS_DISTANCE attributes overall."""
    while True:
        body = str(rng.choice(BODY_COLOURS))
        head = body if rng.random() < 0.6 else _other(rng, BODY_COLOURS, body)
        base = Species(
            name=f"Common {genus}", genus=genus, body_shape=str(rng.choice(BODY_SHAPES)), body_colour=body,
            pattern=str(rng.choice(PATTERNS)), pattern_colour=PATTERN_COLOUR[body], head_colour=head,
            wing_colour=_other(rng, BODY_COLOURS, body),
            crest=None if rng.random() < 0.4 else _other(rng, BODY_COLOURS, head),
            beak_colour=_other(rng, BEAK_COLOURS, head), tail=str(rng.choice(TAIL_LENGTHS)))
        key = lambda sp: (sp.body_colour, sp.body_shape, sp.pattern)  # noqa: E731
        if all(key(e) != key(base) and attribute_distance(e, base) >= MIN_GENUS_DISTANCE for e in earlier):
            return base


def _variant(base: Species, attribute: str, rng: np.random.Generator) -> Species:
    """``base`` with one attribute changed, named after the change ("Yellow-crested Finch")."""
    g = base.genus
    if attribute == "crest":
        if base.crest is None or rng.random() < 0.5:
            crest = _other(rng, BODY_COLOURS, base.head_colour, base.crest)
        else:
            crest = None
        name = f"Crestless {g}" if crest is None else f"{crest.capitalize()}-crested {g}"
        changes = dict(crest=crest)
    elif attribute == "wing":
        wing = _other(rng, BODY_COLOURS, base.body_colour, base.wing_colour)
        name, changes = f"{wing.capitalize()}-winged {g}", dict(wing_colour=wing)
    elif attribute == "pattern":
        pattern = _other(rng, PATTERNS, base.pattern)
        name, changes = f"{pattern.capitalize()} {g}", dict(pattern=pattern)
    elif attribute == "beak":
        beak = _other(rng, BEAK_COLOURS, base.beak_colour, base.head_colour)
        name, changes = f"{beak.capitalize()}-billed {g}", dict(beak_colour=beak)
    elif attribute == "tail":
        tail = "long" if base.tail == "short" else "short"
        name, changes = f"{tail.capitalize()}-tailed {g}", dict(tail=tail)
    elif attribute == "head":
        head = _other(rng, BODY_COLOURS, base.head_colour, base.crest, base.beak_colour)
        name, changes = f"{head.capitalize()}-headed {g}", dict(head_colour=head)
    else:
        raise ValueError(f"unknown attribute {attribute!r}")
    return dataclasses.replace(base, name=name, distinguishing=(attribute,), **changes)


def max_classes(species_per_genus: int = 4) -> int:
    """The largest ``num_classes`` that ``species_list`` supports for this genus size."""
    return len(GENERA) * species_per_genus


def species_list(num_classes: int, species_per_genus: int = 4) -> list[Species]:
    """The first ``num_classes`` bird species, genus by genus.

    Each genus has ``species_per_genus`` species (the last one may have fewer): its common species
    followed by species that each change one attribute (a different one each). So species of one
    genus differ in one or two attributes, and species of different genera in at least two. The
    list for ``n`` classes is a prefix of the list for any larger ``n`` with the same
    ``species_per_genus``, and a genus's species are the same for every ``species_per_genus``.
    """
    if not 1 <= species_per_genus <= len(VARIANT_ATTRIBUTES) + 1:
        raise ValueError(f"species_per_genus must be in [1, {len(VARIANT_ATTRIBUTES) + 1}], got {species_per_genus}")
    if not 1 <= num_classes <= max_classes(species_per_genus):
        raise ValueError(f"num_classes must be in [1, {max_classes(species_per_genus)}] for "
                         f"species_per_genus={species_per_genus}, got {num_classes}")
    result = [sp for genus in _taxonomy() for sp in genus[:species_per_genus]]
    return result[:num_classes]


@functools.lru_cache(maxsize=1)
def _taxonomy() -> tuple[tuple[Species, ...], ...]:
    """Every genus: its common species, then one variant per attribute of VARIANT_ATTRIBUTES in a
    genus-specific order. Fixed (drawn from _TAXONOMY_SEED)."""
    rng = np.random.default_rng(_TAXONOMY_SEED)
    genera: list[tuple[Species, ...]] = []
    for genus in GENERA:
        base = _genus_base(genus, rng, [g[0] for g in genera])
        order = [str(a) for a in rng.permutation(VARIANT_ATTRIBUTES)]
        genera.append((base, *(_variant(base, a, rng) for a in order)))
    return tuple(genera)


def folder_name(label: int, name: str) -> str:
    """CUB-style class folder: ``folder_name(0, "Yellow-crested Finch") == "001.Yellow_crested_Finch"``."""
    return f"{label + 1:03d}." + name.replace("-", "_").replace(" ", "_")


# =============================================================================================
# Fine-grained birds: drawing
# =============================================================================================

@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:size, :size].astype(np.float32) + 0.5
    return x, y


def _alpha(d: np.ndarray, px: float) -> np.ndarray:
    """Coverage in [0, 1] of a shape from its signed distance ``d`` (local units; < 0 inside),
    with a one-pixel soft edge (``px`` pixels per local unit)."""
    return np.clip(0.5 - d * px, 0.0, 1.0)


class _Shape(NamedTuple):
    """A shape in the bird's frame: ``distance(u, v)`` is its signed distance (< 0 inside), and
    the disc of ``radius`` around ``centre`` contains it."""

    distance: Callable[[np.ndarray, np.ndarray], np.ndarray]
    centre: tuple[float, float]
    radius: float


def _ellipse(x0: float, y0: float, a: float, b: float, angle: float = 0.0) -> _Shape:
    """An ellipse with semi-axes ``a`` (along u before rotation) and ``b``; the distance is the
    exact one for circles and an approximation otherwise."""
    c, s = np.cos(angle), np.sin(angle)

    def distance(u, v):
        du, dv = u - x0, v - y0
        return (np.sqrt(((du * c + dv * s) / a) ** 2 + ((dv * c - du * s) / b) ** 2) - 1.0) * min(a, b)

    return _Shape(distance, (x0, y0), max(a, b))


def _polygon(points: Sequence[tuple[float, float]]) -> _Shape:
    """A convex polygon; the distance is exact inside and a lower bound outside."""
    pts = np.asarray(points, dtype=np.float64)
    area = np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
    sign = 1.0 if area > 0 else -1.0
    edges = []
    for (x1, y1), (x2, y2) in zip(pts, np.roll(pts, -1, axis=0)):
        nx, ny = (y2 - y1) * sign, (x1 - x2) * sign
        norm = np.hypot(nx, ny)
        edges.append((x1, y1, nx / norm, ny / norm))

    def distance(u, v):
        d = None
        for x1, y1, nx, ny in edges:
            e = (u - x1) * nx + (v - y1) * ny
            d = e if d is None else np.maximum(d, e)
        return d

    centre = pts.mean(axis=0)
    return _Shape(distance, (float(centre[0]), float(centre[1])), float(np.max(np.hypot(*(pts - centre).T))))


def _capsule(p: tuple[float, float], q: tuple[float, float], r: float) -> _Shape:
    """The segment from ``p`` to ``q`` thickened by ``r`` (a limb, a branch)."""
    (x1, y1), (x2, y2) = p, q
    dx, dy = x2 - x1, y2 - y1

    def distance(u, v):
        h = np.clip(((u - x1) * dx + (v - y1) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        return np.hypot(u - x1 - h * dx, v - y1 - h * dy) - r

    return _Shape(distance, ((x1 + x2) / 2, (y1 + y2) / 2), float(np.hypot(dx, dy)) / 2 + r)


def _pattern(u, v, pattern: str, px: float) -> np.ndarray:
    """Coverage of the body pattern (stripes, spots, checks) in the bird's own frame."""
    if pattern == "striped":
        period = 0.32
        return _alpha((np.abs(np.mod(u / period, 1.0) - 0.5) - 0.22) * period, px)
    if pattern == "spotted":
        period = 0.36
        shift = np.mod(np.floor(v / period), 2.0) * 0.5  # offset alternate rows
        du = np.mod(u / period + shift, 1.0) - 0.5
        dv = np.mod(v / period, 1.0) - 0.5
        return _alpha((np.hypot(du, dv) - 0.27) * period, px)
    if pattern == "checkered":
        period = 0.3
        return np.mod(np.floor(u / period) + np.floor(v / period), 2.0).astype(np.float32)
    return np.zeros_like(u)


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: float = 8.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0.0, amount, 3), 0, 255).astype(np.float32)


def _background(size: int, rng: np.random.Generator, name: str, texture: str) -> np.ndarray:
    x, y = _pixel_grid(size)
    base = _jitter(rng, BACKGROUNDS[name], 10.0)
    tilt = rng.uniform(-0.25, 0.25, 2)
    shade = 1.0 + tilt[0] * (x / size - 0.5) + tilt[1] * (y / size - 0.5)
    img = base * shade[..., None]
    if texture == "mottled":
        coarse = rng.normal(0.0, 1.0, (6, 6)).astype(np.float32)
        blobs = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        img = img * (1.0 + 0.16 * blobs[..., None])
    elif texture == "speckled":
        img = img + rng.normal(0.0, 22.0, (size, size, 1)).astype(np.float32)
    return img


def render(species: Species, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """One uint8 [size, size, 3] image of ``species`` and the scene it shows.

    The scene holds what varies from image to image: ``facing`` ("left"/"right"), ``perched``
    (bool), ``background`` (a BACKGROUNDS name), ``texture`` (a TEXTURES name), and the pose
    (``x``, ``y``: centre as a fraction of the size; ``scale``: pixels per body half-length as a
    fraction of the size; ``rotation`` in degrees; ``brightness``; ``noise``).
    """
    sp = species
    scene = {
        "facing": "left" if rng.random() < 0.5 else "right",
        "perched": bool(rng.random() < 0.5),
        "background": str(rng.choice(list(BACKGROUNDS))),
        "texture": str(rng.choice(TEXTURES)),
    }
    scale = float(rng.uniform(0.16, 0.22))
    slack = max(0.0, 0.5 - 2.2 * scale)
    scene.update(x=0.5 + float(rng.uniform(-slack, slack)), y=0.5 + float(rng.uniform(-slack, slack) * 0.6),
                 scale=scale, rotation=float(rng.uniform(-20.0, 20.0)),
                 brightness=float(rng.uniform(0.85, 1.15)), noise=float(rng.uniform(2.0, 7.0)))

    img = _background(size, rng, scene["background"], scene["texture"])
    px = scale * size  # pixels per local unit
    theta = np.deg2rad(scene["rotation"])
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    mirror = -1.0 if scene["facing"] == "left" else 1.0
    x0, y0 = scene["x"] * size, scene["y"] * size

    def paint(shape: _Shape, rgb: np.ndarray, pattern: str = "plain") -> None:
        """Blends ``rgb`` into the image over ``shape``, only within the pixels its disc covers."""
        cu, cv = shape.centre[0] * mirror, shape.centre[1]
        cx, cy = x0 + (cu * cos - cv * sin) * px, y0 + (cu * sin + cv * cos) * px
        r = shape.radius * px + 2.0
        xa, xb = max(int(cx - r), 0), min(int(cx + r) + 1, size)
        ya, yb = max(int(cy - r), 0), min(int(cy + r) + 1, size)
        if xa >= xb or ya >= yb:
            return
        x, y = _pixel_grid(size)
        dx, dy = (x[ya:yb, xa:xb] - x0) / px, (y[ya:yb, xa:xb] - y0) / px
        u, v = (dx * cos + dy * sin) * mirror, dy * cos - dx * sin  # facing +u, v pointing down
        alpha = _alpha(shape.distance(u, v), px)
        if pattern != "plain":
            alpha *= _pattern(u, v, pattern, px)
        window = img[ya:yb, xa:xb]
        window += alpha[..., None] * (rgb - window)

    # Every palette colour is jittered, used or not, so that two species drawn from the same rng
    # state get the same scene, pose, noise and shades and differ only where their attributes do.
    colour = {k: _jitter(rng, rgb) for k, rgb in PALETTE.items()}
    branch = _jitter(rng, (95, 65, 35))
    a, b = (1.0, 0.75) if sp.body_shape == "round" else (1.2, 0.55)
    hx, hy, hr = 0.85 * a, -0.8 * b, 0.28 + 0.18 * b
    tail = 0.45 if sp.tail == "short" else 1.0
    foot = b + 0.32

    if scene["perched"]:
        paint(_capsule((-2.4, foot + 0.08), (2.4, foot - 0.05), 0.09), branch)
    for leg in (-0.15, 0.2):
        paint(_capsule((leg, 0.6 * b), (leg + 0.05, foot), 0.05), np.float32([60, 55, 50]))
    paint(_polygon([(-0.7 * a, -0.2 * b), (-a - tail, -0.55 * b), (-a - tail, 0.1 * b), (-0.7 * a, 0.25 * b)]),
          colour[sp.wing_colour])
    body = _ellipse(0.0, 0.0, a, b)
    paint(body, colour[sp.body_colour])
    if sp.pattern != "plain":
        paint(body, colour[sp.pattern_colour], pattern=sp.pattern)
    paint(_ellipse(-0.15 * a, -0.05 * b, 0.62 * a, 0.5 * b, angle=-0.25), colour[sp.wing_colour])
    if sp.crest is not None:
        paint(_polygon([(hx - 0.7 * hr, hy - 0.4 * hr), (hx - 1.1 * hr, hy - 1.6 * hr - 0.2),
                        (hx + 0.1 * hr, hy - 0.8 * hr)]), colour[sp.crest])
        paint(_polygon([(hx - 0.2 * hr, hy - 0.7 * hr), (hx - 0.3 * hr, hy - 1.7 * hr - 0.2),
                        (hx + 0.5 * hr, hy - 0.7 * hr)]), colour[sp.crest])
    paint(_ellipse(hx, hy, hr, hr), colour[sp.head_colour])
    paint(_polygon([(hx + 0.75 * hr, hy - 0.35 * hr), (hx + hr + 0.42, hy + 0.1 * hr),
                    (hx + 0.75 * hr, hy + 0.45 * hr)]), colour[sp.beak_colour])
    eye_x, eye_y = hx + 0.35 * hr, hy - 0.2 * hr
    paint(_ellipse(eye_x, eye_y, 0.11, 0.11), np.float32([235, 235, 235]))
    paint(_ellipse(eye_x, eye_y, 0.065, 0.065), np.float32([10, 10, 10]))

    img *= scene["brightness"]
    img += rng.normal(0.0, scene["noise"], img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), scene


# =============================================================================================
# Fine-grained birds: captions and descriptions
# =============================================================================================

def _phrases(sp: Species, pick) -> dict[str, str]:
    """One wording of each class attribute; ``pick(options)`` chooses among alternatives."""
    b, p, w = sp.body_colour, sp.pattern_colour, sp.wing_colour
    body = {
        "plain": [f"a plain {b} body", f"a solid {b} body", f"plain {b} plumage"],
        "striped": [f"a {b} body with {p} stripes", f"a {b} and {p} striped body",
                    f"{b} plumage barred with {p} stripes"],
        "spotted": [f"a {b} body with {p} spots", f"a {p}-spotted {b} body", f"{b} plumage covered in {p} spots"],
        "checkered": [f"a {b} and {p} checkered body", f"a {b} body with a {p} checkered pattern",
                      f"{b} plumage in a {p} checkerboard pattern"],
    }[sp.pattern]
    crest = ([f"a {sp.crest} crest", f"a pointed {sp.crest} crest", f"a spiky {sp.crest} crest"] if sp.crest
             else ["no crest", "a smooth head without a crest"])
    head = ([f"a {sp.head_colour} head"] if sp.head_colour != b
            else [f"a {b} head", f"a head the same {b} as its body"])
    return {
        "body": pick(body), "crest": pick(crest), "head": pick(head),
        "wings": pick([f"{w} wings", f"{w} wing feathers"]),
        "tail": pick([f"a {sp.tail} {w} tail", f"a {w} tail that is {sp.tail}"]),
        "beak": pick([f"a {sp.beak_colour} beak", f"a {sp.beak_colour} bill"]),
        "shape": pick({"round": ["round", "plump", "rounded"],
                       "slender": ["slender", "slim", "sleek"]}[sp.body_shape]),
    }


def _articles(text: str) -> str:
    """Turns "a" into "an" before a vowel ("a orange head" -> "an orange head")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


_CAPTION_TEMPLATES = (
    "{name}: a {shape} bird with {body}, {head}, {crest}, {wings}, {tail} and {beak}, {facing}.",
    "a photo of a {name}, a {shape} bird with {body} and {crest}; it has {head}, {wings}, {tail} and {beak}, "
    "{where}.",
    "{name} {facing}: {body}, {head}, {crest}, {wings}, {tail}, {beak}.",
    "a {shape} {name} {where}, showing {body}, {wings} and {crest}, with {head}, {beak} and {tail}.",
    "close-up of a {name}: {crest}, {head}, {beak}, {body}, {wings} and {tail}, {facing}, {where}.",
    "{name}, {facing}, with {body}, {head} with {crest}, {beak}, {wings} and {tail}.",
    "this {name} has {body}, {crest}, {head}, {beak}, {wings} and {tail}; it is {where}.",
    "a {shape} {name}: {wings}, {tail}, {body}, {head}, {crest} and {beak}{perch}.",
)


def image_captions(species: Species, scene: dict[str, Any], num_captions: int,
                   rng: np.random.Generator) -> list[str]:
    """``num_captions`` captions of one image: each names the class and every class attribute, and
    some say which way the bird faces, whether it is perched and what background it is on.

    Distinct templates are used while they last; wordings of each attribute vary at random.
    """
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    name = species.name.lower()
    order = list(rng.permutation(len(_CAPTION_TEMPLATES)))
    captions = []
    for i in range(num_captions):
        template = _CAPTION_TEMPLATES[order[i % len(order)]]
        facing = pick([f"facing {scene['facing']}", f"looking to the {scene['facing']}"])
        texture = scene["texture"]
        background = pick([f"on a {texture} {scene['background']} background",
                           f"against a {texture} {scene['background']} backdrop"])
        perch = pick([", perched on a branch", ", sitting on a branch"]) if scene["perched"] else ""
        where = f"{perch[2:]} {background}" if perch else background
        captions.append(_articles(template.format(name=name, facing=facing, where=where, perch=perch,
                                                  **_phrases(species, pick))))
    return captions


_DISTINGUISHING = {
    "crest": lambda sp: "lack of a crest" if sp.crest is None else f"{sp.crest} crest",
    "wing": lambda sp: f"{sp.wing_colour} wings and tail",
    "pattern": lambda sp: f"{sp.pattern} body" if sp.pattern != "plain" else "plain, unpatterned body",
    "beak": lambda sp: f"{sp.beak_colour} beak",
    "tail": lambda sp: f"{sp.tail} tail",
    "head": lambda sp: f"{sp.head_colour} head",
}

_DESCRIPTION_TEMPLATES = (
    "The {Name} is a {shape} {genus} with {body}. It has {wings}, {tail}, {head}, {beak} and {crest}.",
    "A {shape} bird, the {Name} is best recognized by its {key}. It has {body}, {head} and {wings}.",
    "The {Name} shows {body}. Look for {crest} and {beak}; it also has {head}, {wings} and {tail}.",
    "Compared with other birds of its genus, the {Name} stands out for its {key}. Otherwise it has {body}, "
    "{wings}, {crest} and {beak}.",
    "This {shape} bird has {head}, {crest}, {body} and {wings}, with {tail} and {beak}.",
    "The {Name} is a {genus} with {body}, {wings}, {head}, {crest}, {beak} and {tail}.",
)


def class_descriptions(species: Species, num_descriptions: int = 6) -> list[str]:
    """Descriptions of a class in the style of GIST's LLM-written ones (the input of caption
    matching): several sentences naming its attributes, some leading with what sets it apart from
    the rest of its genus. Fixed per species (independent of the dataset seed)."""
    rng = np.random.default_rng([_TAXONOMY_SEED, *species.name.encode()])
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if species.distinguishing:
        key = " and ".join(_DISTINGUISHING[a](species) for a in species.distinguishing)
    else:
        key = f"{species.body_colour} body and {species.wing_colour} wings"
    out = []
    for i in range(num_descriptions):
        template = _DESCRIPTION_TEMPLATES[i % len(_DESCRIPTION_TEMPLATES)]
        out.append(_articles(template.format(Name=species.name, genus=species.genus.lower(), key=key,
                                             **_phrases(species, pick))))
    return out


# =============================================================================================
# Fine-grained birds: CODER knowledge
# =============================================================================================

# The templates of the dataset's CODER knowledge file (the format of ``jaxgist.heads.coder.knowledge``).
CODER_TEMPLATES = {
    "name": "a photo of a {name}, a type of bird.",
    "attribute": "a photo of a {name}, a type of bird, which has {attribute}.",
    "analogous": "a photo of a {name}, a bird similar to the {analogous}.",
}
# Which part phrase (``_part_phrases``) names the attribute a species departs from its genus in.
_DISTINGUISHING_PART = {"crest": "crest", "wing": "wings", "pattern": "body", "beak": "beak", "tail": "tail",
                        "head": "head"}


def _part_phrases(sp: Species) -> dict[str, str]:
    """One fixed phrase per visible part of a species (shape, body and pattern, head, wings, crest,
    beak, tail)."""
    b, p = sp.body_colour, sp.pattern_colour
    body = {"plain": f"a plain {b} body", "striped": f"a {b} body with {p} stripes",
            "spotted": f"a {b} body with {p} spots",
            "checkered": f"a {b} and {p} checkered body"}.get(sp.pattern, f"a {sp.pattern} {b} body")
    phrases = {
        "shape": f"a {sp.body_shape} body shape",
        "body": body,
        "head": f"a {sp.head_colour} head",
        "wings": f"{sp.wing_colour} wings",
        "crest": f"a {sp.crest} crest" if sp.crest else "no crest",
        "beak": f"a {sp.beak_colour} beak",
        "tail": f"a {sp.tail} {sp.wing_colour} tail",
    }
    return {k: _articles(v) for k, v in phrases.items()}


def coder_knowledge(species: Sequence[Species]) -> dict[str, Any]:
    """The CODER knowledge of a dataset of ``species`` (in label order), as the JSON object of the
    knowledge-file format (``jaxgist.heads.coder.knowledge``; written as ``coder_knowledge.json``).

    Per class: its attributes are the phrases of its parts (``_part_phrases``); its synonym names the
    genus and what sets the species apart ("finch with a yellow crest"; for a genus's common species,
    its body and wings); its analogous classes are the other species of its genus in the dataset.
    Pair texts (i, j) for every ordered pair of species of one genus, two per part phrase in which they
    differ: "a X has <i's phrase>, while a Y has <j's phrase>." and "a X differs from a Y in having
    <i's phrase>.".
    """
    names = [sp.name for sp in species]
    phrases = [_part_phrases(sp) for sp in species]
    classes = []
    for i, sp in enumerate(species):
        dist = [d for d in sp.distinguishing if d in _DISTINGUISHING_PART]
        key = (" and ".join(phrases[i][_DISTINGUISHING_PART[d]] for d in dist) if dist
               else f"{phrases[i]['body']} and {phrases[i]['wings']}")
        classes.append({"name": sp.name, "synonyms": [_articles(f"{sp.genus.lower()} with {key}")],
                        "attributes": list(phrases[i].values()),
                        "analogous": [names[j] for j, other in enumerate(species)
                                      if j != i and other.genus == sp.genus]})
    pairs = {}
    for i, j in itertools.permutations(range(len(species)), 2):
        if species[i].genus != species[j].genus:
            continue
        texts = []
        for part, mine in phrases[i].items():
            theirs = phrases[j][part]
            if mine != theirs:
                texts.append(_articles(f"a {names[i]} has {mine}, while a {names[j]} has {theirs}."))
                texts.append(_articles(f"a {names[i]} differs from a {names[j]} in having {mine}."))
        if texts:
            pairs[f"{i},{j}"] = texts
    return {"version": 1, "templates": dict(CODER_TEMPLATES), "classes": classes, "pairs": pairs}


# =============================================================================================
# Fine-grained birds: the dataset on disk
# =============================================================================================

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CODER_KNOWLEDGE = "coder_knowledge.json"
SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a written dataset (the ``data.*`` config keys of a GIST-format run) and its classes.

    ``few_shot`` maps k to the metadata CSV whose train split has k images per class.
    ``created`` is False when an existing complete dataset was reused.
    """

    root: str
    metadata: str
    few_shot: dict[int, str]
    image_dir: str
    captions: str
    descriptions: str
    classes: str
    attributes: str
    coder_knowledge: str
    manifest: str
    class_names: tuple[str, ...]
    num_images: int
    created: bool


def _params(**kw) -> dict[str, Any]:
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, **kw}))


def _paths(root: str, params: dict[str, Any], names: Sequence[str], num_images: int,
           created: bool) -> SyntheticDataset:
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    return SyntheticDataset(
        root=root, metadata=j("metadata.csv"),
        few_shot={k: j(f"metadata_{k}shot.csv") for k in params["shots"]},
        image_dir=j("images"), captions=j(f"captions_top{params['num_captions']}.json"),
        descriptions=j("long_captions.json"), classes=j("classes.txt"), attributes=j("attributes.json"),
        coder_knowledge=j(CODER_KNOWLEDGE), manifest=j(MANIFEST), class_names=tuple(names), num_images=num_images, created=created)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _write_metadata(path: str, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "label", "species", "split"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _read_manifest(root: str) -> dict[str, Any] | None:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_dataset(out_dir: str | os.PathLike, *, num_classes: int = 20, train_per_class: int = 30,
                  val_per_class: int = 5, test_per_class: int = 10, image_size: int = 112, seed: int = 0,
                  num_captions: int = 5, num_descriptions: int = 6, shots: Sequence[int] = (1, 3, 5),
                  species_per_genus: int = 4, jpeg_quality: int = 90, first_class: int = 0,
                  overwrite: bool = False) -> SyntheticDataset:
    """Writes a fine-grained bird dataset in GIST's format and returns its paths.

    The classes are species ``first_class .. first_class + num_classes - 1`` of ``species_list``
    (labelled from 0), so datasets with disjoint ranges share no species (the demo pretrains on
    one range and evaluates on another).

    Layout of ``out_dir`` (CUB's conventions):

        images/001.Common_Finch/Common_Finch_0001.jpg ...   JPEG, image_size x image_size
        metadata.csv               filename,label,species,split (train, val, test rows of every class)
        metadata_{k}shot.csv       the same val and test rows, k train rows per class (k in ``shots``;
                                   nested: the 1-shot images are among the 3-shot ones)
        captions_top{n}.json       train filename -> n captions of that image (n = num_captions)
        long_captions.json         class key ("yellow-crested-finch") -> num_descriptions descriptions
        classes.txt                "1 001.Common_Finch" per line
        attributes.json            {"classes": {name: attributes}, "images": {filename: scene}}
        coder_knowledge.json       the classes' CODER knowledge (``coder_knowledge``; the format of
                                   ``jaxgist.heads.coder.knowledge``)
        manifest.json              the parameters; written last, so it marks a complete dataset

    The dataset is built in a temporary sibling directory and moved into place, so an interrupted
    run leaves no partial ``out_dir``. If ``out_dir`` already holds a dataset written with the same
    parameters, it is reused (``created=False``). If its parameters differ, this raises ValueError
    unless ``overwrite`` is set, in which case the whole directory is replaced. A non-empty
    ``out_dir`` without a manifest is never touched (ValueError).
    """
    root = os.path.abspath(os.fspath(out_dir))
    shots = tuple(sorted({int(k) for k in shots}))
    params = _params(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                     test_per_class=test_per_class, image_size=image_size, seed=seed, num_captions=num_captions,
                     num_descriptions=num_descriptions, shots=shots, species_per_genus=species_per_genus,
                     first_class=first_class,
                     jpeg_quality=jpeg_quality)
    if first_class < 0:
        raise ValueError(f"first_class must be >= 0, got {first_class}")
    species = species_list(first_class + num_classes, species_per_genus)[first_class:]
    names = [sp.name for sp in species]
    if train_per_class < 1 or val_per_class < 0 or test_per_class < 0:
        raise ValueError(f"need train_per_class >= 1 and val/test_per_class >= 0, got "
                         f"{train_per_class}/{val_per_class}/{test_per_class}")
    if shots and (shots[0] < 1 or shots[-1] > train_per_class):
        raise ValueError(f"shots {shots} must lie in [1, train_per_class={train_per_class}]")
    if image_size < 16 or num_captions < 1 or num_descriptions < 1:
        raise ValueError(f"need image_size >= 16, num_captions >= 1, num_descriptions >= 1; got "
                         f"{image_size}, {num_captions}, {num_descriptions}")
    num_images = num_classes * (train_per_class + val_per_class + test_per_class)

    if os.path.isdir(root) and os.listdir(root):
        manifest = _read_manifest(root)
        if manifest is None:
            raise ValueError(f"{root} is not empty and holds no {MANIFEST}: not a synthetic dataset, "
                             f"refusing to write into it")
        if manifest.get("params") == params:
            logging.info("synthetic dataset in %s is complete with these parameters; reusing it", root)
            knowledge = os.path.join(root, CODER_KNOWLEDGE)
            if not os.path.isfile(knowledge):  # written before datasets carried their CODER knowledge
                tmp = f"{knowledge}.tmp-{os.getpid()}"
                _write_json(tmp, coder_knowledge(species))
                os.replace(tmp, knowledge)
            return _paths(root, params, names, num_images, created=False)
        if not overwrite:
            old = manifest.get("params", {})
            diff = {k: (old.get(k), params[k]) for k in params if old.get(k) != params[k]}
            raise ValueError(f"{root} holds a synthetic dataset written with other parameters "
                             f"(name: (existing, requested)) {diff}; pass overwrite=True (--overwrite) "
                             f"to replace it, or choose another directory")

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a plain directory's mode
    try:
        _generate(tmp, params, species)
        if os.path.isdir(root):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            os.rename(root, os.path.join(old, "d"))
            os.rename(tmp, root)
            shutil.rmtree(old)
        else:
            os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(root, params, names, num_images, created=True)


def _generate(root: str, params: dict[str, Any], species: Sequence[Species]) -> None:
    p = params
    per_split = {"train": p["train_per_class"], "val": p["val_per_class"], "test": p["test_per_class"]}
    total = len(species) * sum(per_split.values())
    size, seed = p["image_size"], p["seed"]
    rows, captions, scenes = [], {}, {}
    train_by_class: list[list[int]] = []  # row indices of each class's train images
    start = last_log = time.perf_counter()
    done = 0
    for label, sp in enumerate(species):
        folder = folder_name(label, sp.name)
        os.makedirs(os.path.join(root, "images", folder))
        stem = folder.split(".", 1)[1]
        train_by_class.append([])
        number = 0
        for split_id, split in enumerate(SPLIT_NAMES):
            for j in range(per_split[split]):
                number += 1
                rng = np.random.default_rng([seed, label, split_id, j])
                image, scene = render(sp, size, rng)
                filename = f"{folder}/{stem}_{number:04d}.jpg"
                Image.fromarray(image).save(os.path.join(root, "images", *filename.split("/")),
                                            format="JPEG", quality=p["jpeg_quality"], subsampling=0)
                if split == "train":
                    captions[filename] = image_captions(sp, scene, p["num_captions"], rng)
                    train_by_class[-1].append(len(rows))
                rows.append({"filename": filename, "label": label, "species": sp.name, "split": split})
                scenes[filename] = scene
                done += 1
                now = time.perf_counter()
                if now - last_log > 5.0 or done == total:
                    rate = done / max(now - start, 1e-9)
                    logging.info("synthetic: %d/%d images (%.0f images/s, ETA %.0f s)", done, total, rate,
                                 (total - done) / rate)
                    last_log = now

    _write_metadata(os.path.join(root, "metadata.csv"), rows)
    # Few-shot subsets: one random order of each class's train images; k shots are its first k.
    rng = np.random.default_rng([seed, 1_000_003])
    orders = [[idx[i] for i in rng.permutation(len(idx))] for idx in train_by_class]
    for k in p["shots"]:
        keep = {i for order in orders for i in order[:k]}
        _write_metadata(os.path.join(root, f"metadata_{k}shot.csv"),
                        [r for i, r in enumerate(rows) if r["split"] != "train" or i in keep])
    _write_json(os.path.join(root, f"captions_top{p['num_captions']}.json"), captions)
    _write_json(os.path.join(root, "long_captions.json"),
                {class_key(sp.name): class_descriptions(sp, p["num_descriptions"]) for sp in species})
    with open(os.path.join(root, "classes.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{label + 1} {folder_name(label, sp.name)}\n" for label, sp in enumerate(species))
    _write_json(os.path.join(root, "attributes.json"),
                {"classes": {sp.name: {"genus": sp.genus, "distinguishing": list(sp.distinguishing),
                                       **sp.attributes()} for sp in species},
                 "images": scenes})
    _write_json(os.path.join(root, CODER_KNOWLEDGE), coder_knowledge(species))
    counts = {s: len(species) * n for s, n in per_split.items()}
    _write_json(os.path.join(root, MANIFEST),
                {"generator": "jaxgist.data.synthetic.write_dataset", "params": params,
                 "num_classes": len(species), "images_per_split": counts})


# =============================================================================================
# Command line
# =============================================================================================

def _parse_flags(argv: Sequence[str]):
    from absl.flags import argparse_flags

    parser = argparse_flags.ArgumentParser(
        prog="python -m jaxgist.data.synthetic",
        description="Write a synthetic fine-grained bird dataset in GIST's format.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_classes", type=int, default=20)
    parser.add_argument("--train_per_class", type=int, default=30)
    parser.add_argument("--val_per_class", type=int, default=5)
    parser.add_argument("--test_per_class", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_captions", type=int, default=5)
    parser.add_argument("--num_descriptions", type=int, default=6)
    parser.add_argument("--shots", default="1,3,5", help="comma-separated few-shot sizes ('' for none)")
    parser.add_argument("--species_per_genus", type=int, default=4)
    parser.add_argument("--jpeg_quality", type=int, default=90)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset in --out that was written with other parameters")
    return parser.parse_args(argv[1:])


def _main(args) -> None:
    shots = tuple(int(k) for k in args.shots.split(",") if k.strip())
    start = time.perf_counter()
    try:
        ds = write_dataset(args.out, num_classes=args.num_classes, train_per_class=args.train_per_class,
                           val_per_class=args.val_per_class, test_per_class=args.test_per_class,
                           image_size=args.image_size, seed=args.seed, num_captions=args.num_captions,
                           num_descriptions=args.num_descriptions, shots=shots,
                           species_per_genus=args.species_per_genus, jpeg_quality=args.jpeg_quality,
                           overwrite=args.overwrite)
    except ValueError as e:
        sys.exit(f"error: {e}")
    verb = "wrote" if ds.created else "reused (already complete)"
    print(f"{verb} {ds.root}: {len(ds.class_names)} classes, {ds.num_images} images of "
          f"{args.image_size}px in {time.perf_counter() - start:.1f} s")
    print(f"  --config.data.metadata={ds.metadata}")
    print(f"  --config.data.image_dir={ds.image_dir}")
    print(f"  --config.data.captions={ds.captions}")
    print(f"  --config.data.descriptions={ds.descriptions}")
    print(f"  few-shot metadata: {', '.join(os.path.basename(p) for p in ds.few_shot.values()) or 'none'}")
    print(f"  classes: {', '.join(ds.class_names[:6])}{', ...' if len(ds.class_names) > 6 else ''}")


if __name__ == "__main__":
    from absl import app

    app.run(_main, flags_parser=_parse_flags)
