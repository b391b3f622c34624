"""Prompt templates for zero-shot class embeddings: CLIP's published lists and a few of our own.

Each template is a string with one ``{}`` placeholder for the class name, the form
``zero_shot.class_embeddings(model, tokenize, classnames, templates)`` takes:

    text_weights = zero_shot.class_embeddings(model, tokenize, names, templates.get("birds"))
    templates.names()    # imagenet (CLIP's 80), imagenet7, birds, flowers, aircraft, cars, dermatology, default

``get(name)`` accepts those names and the aliases in ``ALIASES`` (dataset names such as ``cub``,
``flower``, ``fgvc_aircraft``, ``fitzpatrick40``), case-insensitively, ``-`` read as ``_``. Where each
list comes from (CLIP's notebook and ``data/prompts.md``; ``dermatology`` is ours): docs/methods/clip.md.
"""

from __future__ import annotations

__all__ = ["IMAGENET", "IMAGENET7", "BIRDS", "FLOWERS", "AIRCRAFT", "CARS", "DERMATOLOGY", "DEFAULT", "TEMPLATES",
           "ALIASES", "get", "names"]

IMAGENET: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

IMAGENET7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

BIRDS: tuple[str, ...] = ("a photo of a {}, a type of bird.",)

FLOWERS: tuple[str, ...] = ("a photo of a {}, a type of flower.",)

AIRCRAFT: tuple[str, ...] = (
    "a photo of a {}, a type of aircraft.",
    "a photo of the {}, a type of aircraft.",
)

CARS: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

DERMATOLOGY: tuple[str, ...] = (
    "a photo of {}, a type of skin condition.",
    "a photo of {}, a type of skin disease.",
    "a clinical photo of {}.",
    "a dermatology photo of {}.",
    "a close-up photo of skin with {}.",
    "a photo of a skin lesion of {}.",
)

DEFAULT: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET,
    "imagenet7": IMAGENET7,
    "birds": BIRDS,
    "flowers": FLOWERS,
    "aircraft": AIRCRAFT,
    "cars": CARS,
    "dermatology": DERMATOLOGY,
    "default": DEFAULT,
}

# Other names of the lists above: datasets (as GIST, CLIP and Tip-Adapter name them) and plurals.
ALIASES: dict[str, str] = {
    "cub": "birds", "cub200": "birds", "birdsnap": "birds", "bird": "birds",
    "flower": "flowers", "flowers102": "flowers", "oxford_flowers": "flowers",
    "fgvc": "aircraft", "fgvc_aircraft": "aircraft", "fgvcaircraft": "aircraft",
    "car": "cars", "stanford_cars": "cars", "stanfordcars": "cars",
    "fitzpatrick": "dermatology", "fitzpatrick17k": "dermatology", "fitzpatrick40": "dermatology",
    "skin": "dermatology",
}


def names() -> tuple[str, ...]:
    """The canonical list names (``TEMPLATES``' keys), sorted."""
    return tuple(sorted(TEMPLATES))


def get(name: str) -> tuple[str, ...]:
    """The templates called ``name`` (a key of ``TEMPLATES`` or ``ALIASES``, any case; ``-`` = ``_``)."""
    if not isinstance(name, str):
        raise TypeError(f"template list name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in TEMPLATES:
        aliases = ", ".join(f"{a} ({c})" for a, c in sorted(ALIASES.items()))
        raise ValueError(f"unknown template list {name!r}: known lists are {', '.join(names())}; "
                       f"aliases: {aliases}")
    return TEMPLATES[key]
