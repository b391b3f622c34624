"""The describe jobs end to end against a real chat-completions server on 127.0.0.1 (the fake server of
tests/describe), and their files read by the stages that use them: GIST's match and fine-tuning
inputs, CODER's knowledge, per-image descriptions."""

import base64
import hashlib
import io
import json
import pathlib
import re
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "describe"))
sys.path.insert(0, str(ROOT))

from fake_chat_server import FakeChatServer  # noqa: E402

from configs import describe as describe_config  # noqa: E402
from jaxgist.data import datasets, sources  # noqa: E402
from jaxgist.main import run_job  # noqa: E402


def _h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def answer(prompt: str) -> str:
    """A deterministic model: each prompt kind answered in the form its prompt asks for."""
    quoted = re.findall(r'"([^"]+)"', prompt)
    name = quoted[0] if quoted else "?"
    n = int(m.group(1)) if (m := re.search(r"\b(\d+)\b", prompt)) else 3
    if "different descriptions" in prompt:
        return json.dumps([f"A {name} with feature {_h(prompt, i) % 997} on its wing." for i in range(n)])
    if prompt.startswith("Summarize"):
        return f"{name}: short feature {_h(prompt) % 97}"
    if "visual attributes" in prompt:
        return json.dumps([f"attribute {i} of {name}" for i in range(n)])
    if "other names" in prompt:
        return "[]" if _h(name) % 2 else json.dumps([f"{name} alias"])
    if "look similar to" in prompt:  # the first candidate is the name of a class of the dataset
        exclude = prompt.split("any of these:")[1].split(".")[0]
        first = exclude.split(",")[0].strip()
        return json.dumps([first] + [f"{name} lookalike {_h(prompt, i) % 50}" for i in range(n)])
    if "How can you tell" in prompt:
        return json.dumps([f"{quoted[0]} has a longer tail than {quoted[1]}."])
    if "in this image" in prompt:
        return f"A small bird seen from the side, description {_h(prompt) % 1000}."
    raise AssertionError(f"unexpected prompt: {prompt[:200]}")


@pytest.fixture
def server():
    with FakeChatServer(answer) as s:
        yield s


def config_for(task, server, tmp_path, **describe):
    c = describe_config.get_config(f"task={task},dataset=small")
    c.data.synthetic.dir = str(tmp_path / "birds")
    c.describe.update(dict(base_url=server.url, model="fake-model", concurrency=4, timeout_s=10.0, **describe))
    return c


def test_class_descriptions_feed_the_match_stage(tmp_path, server):
    c = config_for("class_descriptions", server, tmp_path, num_descriptions=6, per_request=4)
    out = run_job(c, str(tmp_path / "work"))["describe"]
    assert out["classes"] == 4 and out["descriptions"] == 24 and out["failed"] == 0
    path = pathlib.Path(out["output"])
    names = datasets.source(c.data, "train", tmp_path / "work", with_captions=False).class_names
    described = sources.read_descriptions(path, names)  # what GIST's match stage reads
    assert all(len(d) == 6 and len(set(d)) == 6 for d in described)
    meta = json.loads(path.with_name(path.name + ".meta.json").read_text())
    assert meta["prompts"] == {"class_descriptions": 1} and meta["model"] == "fake-model"
    assert meta["server"] == server.url and meta["requests"]
    asked = len(server.log)
    assert asked == 4 * 2  # 2 requests of 4 per class
    again = run_job(c, str(tmp_path / "work"))["describe"]  # a rerun asks nothing: every answer is cached
    assert len(server.log) == asked and again["descriptions"] == 24
    assert json.loads(path.read_text()) == {n: d for n, d in zip(names, described)}


def test_summaries_keep_the_captions_files_keys_and_feed_fine_tuning(tmp_path, server):
    c = config_for("summarize", server, tmp_path, summary_words=12)
    work = tmp_path / "work"
    train = datasets.source(c.data, "train", work, with_captions=False)
    matched = {r["filename"]: [f"long description {i} of image {r['filename']}" for i in range(3)] for r in train}
    (tmp_path / "captions_top3.json").write_text(json.dumps(matched))
    c.describe.captions = str(tmp_path / "captions_top3.json")
    out = run_job(c, str(work))["describe"]
    summarized = json.loads(pathlib.Path(out["output"]).read_text())
    assert list(summarized) == list(matched) and all(len(v) == 3 for v in summarized.values())
    first = next(iter(train))
    assert summarized[first["filename"]][0].startswith(train.class_names[first["label"]] + ": ")
    paths = datasets.paths(c.data, work)  # the fine-tuning source reads it as its captions
    pairs = sources.GistSource(paths["metadata"], paths["image_dir"], split="train", captions=out["output"],
                               num_captions=3)
    record = next(iter(pairs))
    assert len(pairs) == len(train) and record["captions"] == summarized[record["filename"]]


def test_coder_knowledge_drops_analogous_classes_too_close_to_the_dataset(tmp_path, server):
    from jaxgist.heads import coder

    # the tiny random CLIP finds every text alike: only a class's own name (cosine 1) is above this bar
    c = config_for("coder_knowledge", server, tmp_path, num_attributes=3, num_analogous=2, pairs_per_class=1,
                   wordnet=False, analogous_max_cosine=0.99999)
    out = run_job(c, str(tmp_path / "work"))["describe"]
    assert out["analogous_dropped_too_close"] >= 4  # each class was offered a class of the dataset first
    names = datasets.source(c.data, "train", tmp_path / "work", with_captions=False).class_names
    k = coder.load_knowledge(out["output"], class_names=names)  # what the CODER heads read
    assert [len(cls.attributes) for cls in k.classes] == [3] * 4
    assert all(len(cls.analogous) == 2 for cls in k.classes)
    assert not any(a in names for cls in k.classes for a in cls.analogous)  # a class of the dataset is never kept
    assert len(k.pairs) >= 4 and all(texts for texts in k.pairs.values())


def test_image_descriptions_send_each_image_once_resized(tmp_path, server):
    c = config_for("image_descriptions", server, tmp_path, image_max_side=32, image_prompt="short")
    out = run_job(c, str(tmp_path / "work"))["describe"]
    described = json.loads(pathlib.Path(out["output"]).read_text())
    files = {r["filename"] for split in ("train", "val", "test")
             for r in datasets.source(c.data, split, tmp_path / "work", with_captions=False)}
    assert set(described) == files and out["described"] == len(files) == 20
    urls = [p["image_url"]["url"] for b in server.bodies for m in b["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "image_url"]
    assert len(urls) == len(files)
    image = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert image.format == "JPEG" and max(image.size) <= 32
    assert np.asarray(image).std() > 0


def test_an_unreachable_server_is_one_line(tmp_path):
    from jaxgist import main

    c = describe_config.get_config("task=class_descriptions,dataset=small")
    c.data.synthetic.dir = str(tmp_path / "birds")
    c.describe.update(dict(base_url="http://127.0.0.1:9/v1", model="m", max_retries=2))
    with pytest.raises(main.user_errors(), match=r"http://127\.0\.0\.1:9/v1"):
        run_job(c, str(tmp_path / "work"))


def test_image_descriptions_feed_flips_hybrid_head_in_the_evaluate_stage(tmp_path, server):
    """configs/flip.py:heads runs FLIP's heads through GIST's embed and evaluate stages; the hybrid head
    reads the describe job's per-image descriptions of every split."""
    from configs import common
    from configs import flip as flip_config
    from jaxgist.models import clip

    c = config_for("image_descriptions", server, tmp_path, image_max_side=32)
    descriptions = run_job(c, str(tmp_path / "describe"))["describe"]["output"]
    g = flip_config.get_config("heads")
    g.model.init = str(clip.save_hf(clip.create(common.TINY_CLIP, seed=0), tmp_path / "tiny"))
    g.data = c.data
    g.gist.update(dict(image_descriptions=descriptions, bootstrap=10, batch_size=16))
    out = run_job(g, str(tmp_path / "heads"))["gist"]["pretrained"]
    assert {"hybrid", "knn", "centroid", "linear_probe_lbfgs", "zero_shot"} <= set(out)
    assert out["hybrid"]["test_count"] == 4 and 0.0 <= out["hybrid"]["test_top1"] <= 1.0
    g.gist.image_descriptions = ""
    with pytest.raises(Exception, match=r"config\.gist\.image_descriptions"):
        run_job(g, str(tmp_path / "heads"))


@pytest.mark.slow
def test_a_killed_job_resumes_asking_only_what_is_missing(tmp_path):
    """SIGKILL in the middle of a class_descriptions job through the CLI; the rerun asks no prompt already
    answered, and its file equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import time

    def command(server, workdir):
        return [sys.executable, "-m", "jaxgist", "--config", str(ROOT / "configs" / "describe.py") +
                ":task=class_descriptions,dataset=small", "--workdir", str(workdir),
                f"--config.data.synthetic.dir={tmp_path / 'birds'}", f"--config.describe.base_url={server.url}",
                "--config.describe.model=fake-model", "--config.describe.num_descriptions=20",
                "--config.describe.per_request=2", "--config.describe.concurrency=2",
                "--compilation_cache=off"]

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with FakeChatServer(answer) as whole:
        subprocess.run(command(whole, tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=300)
    with FakeChatServer(answer, latency_s=0.05) as server:
        proc = subprocess.Popen(command(server, tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(server.answered) < 12 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        answered_before = list(server.answered)
        assert 12 <= len(answered_before) < 40, len(answered_before)  # 4 classes x 10 requests in all
        server.log.clear()
        again = subprocess.run(command(server, tmp_path / "killed"), env=env, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        # a prompt answered before the kill may have been written to the cache or not (killed between the
        # answer and its fsync): at most the requests in flight at the kill are asked again
        repeated = [p for p in server.log if p in answered_before]
        assert len(repeated) <= 2, len(repeated)
        assert len(server.log) == 40 - len(answered_before) + len(repeated)
    name = "describe/long_captions.json"
    assert (tmp_path / "killed" / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_gists_summarize_stage_shortens_the_matched_captions_for_fine_tuning(tmp_path, server):
    from configs import common
    from jaxgist.methods import gist
    from jaxgist.models import clip

    c = gist.default_config()
    c.model.init = str(clip.save_hf(clip.create(common.TINY_CLIP, seed=0), tmp_path / "tiny"))
    c.gist.update(dict(stages=("match", "summarize"), match_model="", match_k=2, batch_size=16))
    c.data.update(dict(source="synthetic", num_captions=2))
    c.data.synthetic.update(dict(num_classes=3, train_per_class=2, val_per_class=1, test_per_class=1,
                                 image_size=48, num_captions=2, shots=(), dir=str(tmp_path / "birds")))
    with pytest.raises(Exception, match=r"stages has 'summarize': set config\.describe\.base_url"):
        gist.run(c, str(tmp_path / "work"))
    c.describe.update(dict(base_url=server.url, model="fake-model", summary_words=12))
    gist.run(c, str(tmp_path / "work"))
    matched = json.loads((tmp_path / "work" / "match" / "captions_top2.json").read_text())
    short = json.loads((tmp_path / "work" / "summarize" / "captions_short.json").read_text())
    assert list(short) == list(matched) and all(len(short[k]) == len(matched[k]) == 2 for k in matched)
    assert all(": short feature" in t for texts in short.values() for t in texts)
    stages = json.loads((tmp_path / "work" / "results.json").read_text())["run"]["gist"]["stages"]
    assert stages["summarize"]["images"] == 6 and stages["summarize"]["failed"] == 0


def test_coder_synonyms_come_from_wordnet_where_it_knows_the_name(tmp_path, server, monkeypatch):
    from jaxgist.methods import describe

    class Synset:
        def lemma_names(self):
            return ["Common_Finch", "grey_finch", "checkered_finch"]

    class WordNet:  # knows one class of the generated birds
        def synsets(self, name):
            return [Synset()] if name == "Common_Finch" else []

    monkeypatch.setattr(describe, "wordnet", lambda: WordNet())
    c = config_for("coder_knowledge", server, tmp_path, num_attributes=2, num_analogous=1, pairs_per_class=1,
                   analogous_max_cosine=0.99999)
    out = run_job(c, str(tmp_path / "work"))["describe"]
    knowledge = json.loads(pathlib.Path(out["output"]).read_text())
    finch = next(k for k in knowledge["classes"] if k["name"] == "Common Finch")
    assert finch["synonyms"] == ["grey finch", "checkered finch"] and out["synonyms_from_wordnet"] == 1
    asked = [p for p in server.log if "other names" in p]
    assert len(asked) == 3 and not any('"Common Finch"' in p for p in asked)  # the model is asked the others only
