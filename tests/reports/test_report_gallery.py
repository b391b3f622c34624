"""The gallery: thumbnails with their matched descriptions and cosines, generated captions beside references."""

import base64
import io
import json
import shutil

from PIL import Image

from jaxgist.core import files
from jaxgist.methods import caption_matching
from jaxgist.reports import gallery, runs


def _image(uri):
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_matched_descriptions_with_their_cosines_one_class_at_a_time(sweep_root):
    run = runs.read_run(sweep_root / "shots-1")
    g = gallery.matched(run, limit=6, size=24)
    captions = json.loads((sweep_root / "shots-1" / "match" / "captions_top3.json").read_text())
    scores = caption_matching.read_scores(sweep_root / "shots-1" / "match" / "captions_top3.scores.json")
    assert g.total == len(captions) == 12 and len(g.items) == 6 and g.note == ""
    assert len({item.label for item in g.items[:4]}) == 4  # every class before a second image of one
    for item in g.items:
        assert [t for t, _ in item.texts] == captions[item.filename]
        assert [s for _, s in item.texts] == scores[item.filename]
        assert max(_image(item.thumbnail).size) <= 24
    assert "6 of 12 training images" in g.title


def test_without_a_matched_file_the_data_captions_are_shown_without_cosines(sweep_root):
    g = gallery.matched(runs.read_run(sweep_root / "shots-3"), limit=3)
    assert g.source.endswith("captions_top2.json") and "no cosines" in g.note
    assert all(s is None for item in g.items for _, s in item.texts)


def test_generated_captions_beside_references(tmp_path, sweep_root, birds):
    workdir = tmp_path / "describe-run"
    shutil.copytree(sweep_root / "shots-1", workdir)
    refs = json.loads(open(birds.captions).read())
    name = next(iter(refs))
    files.write_json_atomic(files.join(workdir, "describe", "image_descriptions.json"), {name: "a small bird"})
    g = gallery.captioning(runs.read_run(workdir))
    assert len(g.items) == 1 and g.items[0].generated == ["a small bird"] and g.items[0].references == refs[name]
    files.write_json_atomic(files.join(workdir, gallery.GENERATED),
                            {name: {"generated": "a finch", "references": ["r1", "r2"]}})
    g = gallery.captioning(runs.read_run(workdir))
    assert g.items[0].generated == ["a finch"] and g.items[0].references == ["r1", "r2"]
    files.write_json_atomic(files.join(workdir, gallery.GENERATED), {name: "no object"})
    try:
        gallery.captioning(runs.read_run(workdir))
    except ValueError as e:
        assert gallery.GENERATED in str(e) and repr(name) in str(e)
    else:
        raise AssertionError("a malformed captions_generated.json must be named")


def test_missing_images_are_a_note(tmp_path, sweep_root):
    workdir = tmp_path / "moved"
    shutil.copytree(sweep_root / "shots-1", workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["data"]["synthetic"]["dir"] = str(tmp_path / "gone")
    (workdir / "config.json").write_text(json.dumps(config))
    g = gallery.matched(runs.read_run(workdir), limit=2)
    assert len(g.items) == 2 and all(item.thumbnail is None for item in g.items)
    assert "does not exist here" in g.note

