"""Prompt templates: CLIP's published lists, their form, and lookup by name or alias."""

import pytest

from jaxgist.evaluation import templates


def test_imagenet_templates_are_clips_80():
    assert len(templates.IMAGENET) == 80 and len(set(templates.IMAGENET)) == 80
    # First, last and a few in between, as in OpenAI's Prompt_Engineering_for_ImageNet notebook.
    assert templates.IMAGENET[0] == "a bad photo of a {}."
    assert templates.IMAGENET[-1] == "a tattoo of the {}."
    assert templates.IMAGENET[39] == "a photo of a {}."
    assert "itap of my {}." in templates.IMAGENET and "a {} in a video game." in templates.IMAGENET
    assert set(templates.IMAGENET7) <= set(templates.IMAGENET) and len(templates.IMAGENET7) == 7


def test_dataset_templates():
    assert templates.get("birds") == ("a photo of a {}, a type of bird.",)
    assert templates.get("flowers") == ("a photo of a {}, a type of flower.",)
    assert templates.get("aircraft")[0] == "a photo of a {}, a type of aircraft."
    assert len(templates.get("cars")) == 8 and "i love my {}!" in templates.get("cars")
    assert templates.get("default") == ("a photo of a {}.",)


@pytest.mark.parametrize("name", templates.names())
def test_every_list_is_well_formed(name):
    lst = templates.get(name)
    assert isinstance(lst, tuple) and lst and len(set(lst)) == len(lst)
    for template in lst:
        assert isinstance(template, str) and template.count("{}") == 1, template
        assert template == template.strip() and "{" not in template.replace("{}", "")
        assert "xeroderma pigmentosum" in template.format("xeroderma pigmentosum")


def test_aliases_and_case():
    assert templates.get("CUB") is templates.BIRDS
    assert templates.get("fgvc-aircraft") is templates.AIRCRAFT
    assert templates.get("Fitzpatrick40") is templates.DERMATOLOGY
    assert templates.get(" flower ") is templates.FLOWERS
    assert templates.get("stanford_cars") is templates.CARS
    assert set(templates.ALIASES.values()) <= set(templates.TEMPLATES)
    assert not set(templates.ALIASES) & set(templates.TEMPLATES)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown template list 'pets'") as info:
        templates.get("pets")
    for name in templates.names():
        assert name in str(info.value)
    assert "cub (birds)" in str(info.value)
    with pytest.raises(TypeError):
        templates.get(None)
