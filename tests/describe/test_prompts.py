"""Prompt files: every one loads and formats; missing or unknown placeholders are clear errors."""

import json

import pytest

from jaxgist.describe import prompts

EXPECTED = {"class_descriptions", "summarize", "coder_attributes", "coder_analogous", "coder_one_vs_one",
            "coder_synonyms", "image_description_short", "image_description_long"}


def test_every_prompt_loads_and_formats():
    assert EXPECTED <= {name.split(".v")[0] for name in prompts.names()}
    for full in prompts.names():
        p = prompts.load(full)
        assert f"{p.name}.v{p.version}" == full and p.placeholders
        text = p.format(**{k: f"<{k}>" for k in p.placeholders})
        assert not prompts.PLACEHOLDER.findall(text), text  # every placeholder filled
        assert not text.startswith("#") and all(f"<{k}>" in text for k in p.placeholders)


def test_class_descriptions_prompt():
    p = prompts.load("class_descriptions")
    assert p.version >= 1 and prompts.load("class_descriptions.v1").version == 1
    assert set(p.placeholders) == {"domain", "classname", "n"}
    text = p.format(domain="bird species", classname="Laysan Albatross", n=10)
    assert "Laysan Albatross" in text and "10" in text and "JSON list" in text


def test_missing_and_unknown_placeholders_are_named():
    p = prompts.load("coder_one_vs_one")
    with pytest.raises(KeyError, match=r"coder_one_vs_one.v1 needs the placeholder\(s\) \['b'\]"):
        p.format(domain="bird species", a="x", n=3)
    with pytest.raises(TypeError, match="no placeholder.*'classname'"):
        p.format(domain="bird species", a="x", b="y", n=3, classname="z")
    with pytest.raises(FileNotFoundError, match="no prompt 'nope'"):
        prompts.load("nope")
    with pytest.raises(FileNotFoundError, match="summarize.v99"):
        prompts.load("summarize.v99")


def test_literal_braces_and_image_messages():
    p = prompts.Prompt("t", 1, 'Answer like {"a": [1]} about {classname}.\n')
    assert p.placeholders == ("classname",)
    assert p.format(classname="x") == 'Answer like {"a": [1]} about x.\n'
    messages = prompts.load("image_description_short").messages(images=["data:image/jpeg;base64,AAAA"],
                                                                domain="bird")
    [message] = messages
    assert message["role"] == "user" and message["content"][0]["image_url"]["url"].startswith("data:image/jpeg")
    assert message["content"][1]["type"] == "text" and "bird" in message["content"][1]["text"]
    json.dumps(messages)
