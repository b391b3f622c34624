"""Versioned prompt texts, files under ``jaxgist/describe/prompts/`` named ``NAME.vN.txt``.

    p = prompts.load("class_descriptions")        # the highest version; or "class_descriptions.v1"
    text = p.format(domain="bird species", classname="Laysan Albatross", n=10)
    messages = p.messages(images=[data_url], description=...)   # one user message, images first
    prompts.names()                                # every NAME.vN available

A file may open with ``#`` comment lines (what the placeholders mean, the expected answer), which are
not part of the prompt. Placeholders are ``{identifier}``; other braces are literal text (JSON examples).
``format`` raises KeyError naming a missing placeholder and TypeError for an unknown one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

DIRECTORY = pathlib.Path(__file__).resolve().parent / "prompts"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FILE_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\.v(?P<version>[0-9]+)\.txt$")


@dataclasses.dataclass(frozen=True)
class Prompt:
    name: str
    version: int
    text: str

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The placeholder names, in order of first use."""
        return tuple(dict.fromkeys(PLACEHOLDER.findall(self.text)))

    def format(self, **values) -> str:
        """The text with every ``{placeholder}`` replaced by ``str(values[placeholder])``."""
        missing = [p for p in self.placeholders if p not in values]
        if missing:
            raise KeyError(f"prompt {self.name}.v{self.version} needs the placeholder(s) {missing} "
                           f"({DIRECTORY / f'{self.name}.v{self.version}.txt'})")
        unknown = sorted(set(values) - set(self.placeholders))
        if unknown:
            raise TypeError(f"prompt {self.name}.v{self.version} has no placeholder(s) {unknown}; "
                            f"it has {list(self.placeholders)}")
        return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), self.text)

    def messages(self, images: tuple[str, ...] | list[str] = (), **values) -> list[dict]:
        """One user chat message: the image URLs (``data:image/jpeg;base64,...``), then the text."""
        text = self.format(**values)
        if not images:
            return [{"role": "user", "content": text}]
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def names() -> list[str]:
    """Every available ``NAME.vN``."""
    return sorted(p.name[:-4] for p in DIRECTORY.glob("*.txt") if FILE_NAME.match(p.name))


def load(name: str) -> Prompt:
    """``NAME`` (its highest version) or ``NAME.vN``."""
    versions = {}
    for path in DIRECTORY.glob("*.txt"):
        m = FILE_NAME.match(path.name)
        if m:
            versions[(m["name"], int(m["version"]))] = path
    m = re.fullmatch(r"(?P<name>[A-Za-z0-9_]+)(?:\.v(?P<version>[0-9]+))?", name)
    if m is None:
        raise ValueError(f"a prompt name is NAME or NAME.vN, got {name!r}")
    found = sorted(v for (n, v) in versions if n == m["name"])
    if not found or (m["version"] is not None and int(m["version"]) not in found):
        raise FileNotFoundError(f"no prompt {name!r} in {DIRECTORY}; available: {names()}")
    version = int(m["version"]) if m["version"] is not None else found[-1]
    lines = versions[(m["name"], version)].read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return Prompt(m["name"], version, "\n".join(lines).strip() + "\n")
