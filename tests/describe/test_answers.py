"""Answer validators: JSON found in what a model wrote, BadAnswer otherwise."""

import pytest

from jaxgist.describe import BadAnswer, answers


def test_json_value_finds_the_json():
    assert answers.json_value('["a", "b"]') == ["a", "b"]
    assert answers.json_value('Sure! Here they are:\n```json\n["a", "b"]\n```\nEnjoy.') == ["a", "b"]
    assert answers.json_value('Here: ["a", "b"] as asked') == ["a", "b"]
    with pytest.raises(BadAnswer, match="no JSON"):
        answers.json_value("I think it is a bird.")


def test_string_list():
    validate = answers.string_list(n=2)
    assert validate('["a ", "b", "c"]') == ["a", "b"]
    assert validate('{"descriptions": ["a", "b"]}') == ["a", "b"]
    with pytest.raises(BadAnswer, match="1 distinct non-empty strings, wanted 2"):
        validate('["a", "a", ""]')
    with pytest.raises(BadAnswer, match="not a JSON list of strings"):
        validate("[1, 2]")
    assert answers.string_list()('["x"]') == ["x"]


def test_one_line():
    validate = answers.one_line(max_words=6)
    caption = validate('Caption: "laysan albatross: white head,\n dark wings"')
    assert caption == "laysan albatross: white head, dark wings"
    with pytest.raises(BadAnswer, match="7 words"):
        validate("one two three four five six seven")
    with pytest.raises(BadAnswer):
        validate("  ")
