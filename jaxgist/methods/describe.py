"""Text that language and vision-language models write for the methods (``config.method = "describe"``,
``configs/describe.py:task=...``), asked of any OpenAI-compatible chat endpoint (``describe.base_url``).

    python -m jaxgist --config configs/describe.py:task=class_descriptions --workdir runs/cub-text \
        --config.describe.base_url=http://localhost:11434/v1 --config.describe.model=llama3.1:8b

Tasks, each writing one file in the format its reader takes, plus ``<file>.meta.json`` (the prompt
name and version, the model, the server, the sampling settings and the request figures):
- ``class_descriptions``: ``describe.num_descriptions`` descriptions per class for GIST's match stage
  (``long_captions.json``: ``{class name: [description, ...]}``), asked ``per_request`` at a time.
- ``summarize``: GIST's step after matching: every matched description of a captions file
  (``describe.captions``; ``{filename: [description, ...]}``) summarized into a short caption, same
  keys and order (the ``captions_top5.json`` format fine-tuning reads).
- ``coder_knowledge``: CODER's knowledge file (``jaxgist.heads.coder``): attributes, synonyms (WordNet
  through ``nltk`` where installed, else the model), analogous classes (a candidate whose CLIP text
  embedding is above ``analogous_max_cosine`` to a class of the dataset is dropped and the model asked
  again, at most ``analogous_rounds`` times) and one-vs-one differences for each class's
  ``pairs_per_class`` most confusable classes under zero-shot CLIP (text-embedding cosine).
- ``image_descriptions``: one description per image of ``describe.splits`` from a vision-language
  endpoint (each image resized to ``image_max_side`` and sent as a base64 JPEG data URL), keyed by
  the metadata's filename: ``{filename: description}``.

Answers are cached in ``workdir/describe/answers.jsonl`` (``jaxgist.describe.cache``): a rerun, or the
rerun of a killed job, asks only what has no answer yet.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import pathlib
import time
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from jaxgist import methods
from jaxgist.core import config as config_lib
from jaxgist.core import files, results
from jaxgist.data import datasets, images
from jaxgist.describe import answers
from jaxgist.describe import cache as cache_lib
from jaxgist.describe import client as client_lib
from jaxgist.describe import prompts

TASKS = ("class_descriptions", "summarize", "coder_knowledge", "image_descriptions")
OUTPUTS = {"class_descriptions": "long_captions.json", "summarize": "captions_short.json",
           "coder_knowledge": "coder_knowledge.json", "image_descriptions": "image_descriptions.json"}


def default_config() -> ml_collections.ConfigDict:
    return methods.clip_job_config("describe", "ViT-B/32", describe=dict(
        task="class_descriptions", base_url="", model="", api_key_env="OPENAI_API_KEY", temperature=0.7,
        max_tokens=1024, seed=-1, timeout_s=60.0, max_retries=5, concurrency=16,
        domain="", output="",
        num_descriptions=20, per_request=10,  # class_descriptions
        captions="",  # summarize: the matched captions file
        splits=("train", "val", "test"), image_prompt="short", image_max_side=512,  # image_descriptions
        summary_words=20,  # summarize
        num_attributes=5, num_analogous=3, analogous_max_cosine=0.9, analogous_rounds=5,  # coder_knowledge
        pairs_per_class=3, pair_texts=1, num_synonyms=3, wordnet=True,
    ))


def validate(config) -> None:
    config_lib.check_keys(config, default_config(), free=("model.preset",))
    d, req = config.describe, config_lib.require
    req(d.task in TASKS, f"config.describe.task={d.task!r} is not one of {TASKS}")
    req(bool(d.base_url), "config.describe.base_url must name an OpenAI-compatible endpoint, e.g. "
        "http://localhost:11434/v1 (Ollama), http://localhost:8000/v1 (vLLM) or https://api.openai.com/v1")
    req(bool(d.model), "config.describe.model must name the server's model (e.g. llama3.1:8b, gpt-4o-mini)")
    req(d.concurrency >= 1 and d.max_retries >= 0 and d.timeout_s > 0 and d.max_tokens >= 1,
        "config.describe.concurrency and max_tokens must be >= 1, max_retries >= 0, timeout_s > 0")
    req(d.num_descriptions >= 1 and d.per_request >= 1, "config.describe.num_descriptions and per_request must be >= 1")
    req(d.image_prompt in ("short", "long"), f"config.describe.image_prompt={d.image_prompt!r} is not short or long")
    req(0.0 < d.analogous_max_cosine <= 1.0 and d.analogous_rounds >= 1,
        "config.describe.analogous_max_cosine must be in (0, 1] and analogous_rounds >= 1")
    if d.task == "summarize":
        req(bool(d.captions), "config.describe.captions must name the matched captions file to summarize")
    datasets.validate(config.data)


def settings(d) -> client_lib.ChatSettings:
    return client_lib.ChatSettings(base_url=d.base_url, model=d.model, api_key_env=d.api_key_env,
                                   temperature=float(d.temperature), max_tokens=int(d.max_tokens),
                                   seed=None if d.seed < 0 else int(d.seed), timeout_s=float(d.timeout_s),
                                   max_retries=int(d.max_retries), concurrency=int(d.concurrency))


def run_task(config, workdir, output: str | pathlib.Path | None = None) -> dict:
    """Runs ``config.describe.task`` and writes its file (``output``, else ``describe.output``, else
    ``workdir/describe/<file>``) and the ``.meta.json`` beside it; returns the figures (``output``,
    ``seconds``, counts, ``requests``). Raises EndpointError, after writing what was answered, when
    requests are left without a usable answer (a rerun asks only those)."""
    d = config.describe
    t0 = time.perf_counter()
    folder = pathlib.Path(workdir) / "describe"
    folder.mkdir(parents=True, exist_ok=True)
    client = client_lib.Client(settings(d), cache_lib.AnswerCache(folder / "answers.jsonl"))
    output = pathlib.Path(output or d.output or folder / OUTPUTS[d.task])
    task = {"class_descriptions": class_descriptions, "summarize": summarize, "coder_knowledge": coder_knowledge,
            "image_descriptions": image_descriptions}[d.task]
    written, used, figures = task(config, workdir, client)
    output.parent.mkdir(parents=True, exist_ok=True)
    files.write_json_atomic(output, written)
    requests = dataclasses.asdict(client.stats)
    meta = {"task": d.task, "prompts": used, "model": d.model, "server": d.base_url,
            "sampling": {"temperature": d.temperature, "max_tokens": d.max_tokens,
                         "seed": None if d.seed < 0 else d.seed}, "requests": requests, **figures}
    files.write_json_atomic(output.with_name(output.name + ".meta.json"), meta)
    logging.info("describe %s: wrote %s (%s)", d.task, output, client.stats.summary())
    out = {"output": str(output), "seconds": round(time.perf_counter() - t0, 2), **figures, "requests": requests}
    if figures.get("failed", 0):
        raise client_lib.EndpointError(
            f"describe {d.task}: {figures['failed']} request(s) had no usable answer after {d.max_retries} "
            f"retries ({'; '.join(figures.get('failed_examples', []))}); {output} holds the rest; rerun the same "
            f"command to ask only those again")
    return out


def run(config, workdir: str) -> dict:
    validate(config)
    out = run_task(config, workdir)
    results.write(workdir, "describe", {}, run=out)
    return {"describe": out}


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

def _user(text: str, image_url: str | None = None) -> list[dict]:
    if image_url is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def _failures(results_: Sequence[Any]) -> dict:
    failed = [r for r in results_ if not r.ok]
    return {"failed": len(failed), "failed_examples": [f"{r.key}: {r.error}" for r in failed[:3]]}


def _domain(config) -> str:
    return config.describe.domain or "category"


def _class_names(config, workdir) -> list[str]:
    return list(datasets.source(config.data, config.data.train_split.split("[")[0], workdir,
                                with_captions=False).class_names)


# ---------------------------------------------------------------------------------------------
# Tasks: each returns (the output's JSON object, the prompts used {name: version}, figures)
# ---------------------------------------------------------------------------------------------

def class_descriptions(config, workdir, client):
    d = config.describe
    prompt = prompts.load("class_descriptions")
    names = _class_names(config, workdir)
    rounds = math.ceil(d.num_descriptions / d.per_request)
    requests = []
    for label, name in enumerate(names):
        for r in range(rounds):
            text = prompt.format(classname=name, domain=_domain(config), n=d.per_request)
            if rounds > 1:  # distinct prompts, so that each set is its own answer (and cache entry)
                text += f"\n\n(This is set {r + 1} of {rounds}: describe features the other sets may not cover.)"
            requests.append(client_lib.Request(key=f"{label}/{r}", messages=_user(text),
                                               validate=answers.string_list(min_items=1)))
    results_ = client.run(requests, desc="class descriptions")
    out: dict[str, list[str]] = {name: [] for name in names}
    for req, res in zip(requests, results_):
        if res.ok:
            name = names[int(req.key.split("/")[0])]
            out[name].extend(t for t in res.value if t not in out[name])
    out = {name: texts[: d.num_descriptions] for name, texts in out.items()}
    short = [n for n, t in out.items() if len(t) < d.num_descriptions]
    figures = {"classes": len(names), "descriptions": sum(map(len, out.values())),
               "classes_short_of_descriptions": len(short), **_failures(results_)}
    return out, {prompt.name: prompt.version}, figures


def summarize(config, workdir, client):
    """Each matched description of ``describe.captions`` shortened, keyed and ordered as the input; the
    class name a summary starts with comes from the metadata's row of each file."""
    from jaxgist.data.sources import DataError, read_captions

    d = config.describe
    prompt = prompts.load("summarize")
    captions = read_captions(d.captions)
    source = datasets.source(config.data, config.data.train_split.split("[")[0], workdir, with_captions=False)
    class_of = {r["filename"]: source.class_names[r["label"]] for r in source}
    unknown = [fn for fn in captions if fn not in class_of]
    if unknown:
        raise DataError(f"{d.captions}: {len(unknown)} key(s) are not files of the training split of "
                        f"{config.data.metadata or config.data.source}, e.g. {unknown[:3]}")
    unique = sorted({(class_of[fn], t) for fn, texts in captions.items() for t in texts})
    requests = [client_lib.Request(key=str(i), messages=_user(prompt.format(classname=name, description=t,
                                                                            max_words=d.summary_words)),
                                   validate=answers.one_line(max_words=d.summary_words))
                for i, (name, t) in enumerate(unique)]
    results_ = client.run(requests, desc="summaries")
    short = {pair: res.value for pair, res in zip(unique, results_) if res.ok}
    out = {fn: [short[(class_of[fn], t)] for t in texts if (class_of[fn], t) in short] for fn, texts in captions.items()}
    figures = {"images": len(captions), "descriptions": len(unique), **_failures(results_)}
    return out, {prompt.name: prompt.version}, figures


def _data_url(path: str, max_side: int) -> str:
    image = images.load_image(path)
    pil = Image.fromarray(image)
    scale = max_side / max(pil.size)
    if scale < 1:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                         Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_descriptions(config, workdir, client):
    d = config.describe
    prompt = prompts.load(f"image_description_{d.image_prompt}")
    records = {}
    for split in d.splits:
        for record in datasets.source(config.data, split, workdir, with_captions=False):
            records.setdefault(record["filename"], record["path"])
    text = prompt.format(domain=_domain(config))
    requests, unreadable = [], []
    for filename, path in records.items():
        try:
            url = _data_url(path, d.image_max_side)
        except (FileNotFoundError, images.ImageReadError) as e:
            if not config.data.skip_unreadable:
                raise images.with_skip_hint(e) from e
            unreadable.append(filename)
            continue
        requests.append(client_lib.Request(key=filename, messages=_user(text, url),
                                           validate=answers.one_line(max_words=None)))
    results_ = client.run(requests, desc="image descriptions")
    out = {res.key: res.value for res in results_ if res.ok}
    figures = {"images": len(records), "described": len(out), "skipped_unreadable": len(unreadable),
               **_failures(results_)}
    return out, {prompt.name: prompt.version}, figures


# ---------------------------------------------------------------------------------------------
# CODER's knowledge
# ---------------------------------------------------------------------------------------------

DEBIAN_WORDNET = "/usr/share/wordnet"  # Debian's wordnet-base package


def wordnet():
    """nltk's WordNet reader (its own corpus, else Debian's files where they are complete), or None
    (nltk not installed, no usable data): synonyms then come from the model."""
    try:
        import nltk
        from nltk.corpus import wordnet as corpus
    except ImportError:
        return None
    try:
        corpus.ensure_loaded()
        return corpus
    except (LookupError, OSError):
        pass
    try:
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        if DEBIAN_WORDNET not in nltk.data.path:
            nltk.data.path.append(DEBIAN_WORDNET)  # nltk reads only below its data path
        return WordNetCorpusReader(DEBIAN_WORDNET, None)
    except (LookupError, OSError, PermissionError, ValueError):  # absent, or without the files nltk needs
        return None


def wordnet_synonyms(reader, name: str, limit: int) -> list[str]:
    """Lemma names of ``name``'s WordNet synsets, other than the name itself, at most ``limit``."""
    out = []
    for synset in reader.synsets(name.strip().replace(" ", "_")):
        for lemma in synset.lemma_names():
            text = lemma.replace("_", " ")
            if text.lower() != name.lower() and text not in out:
                out.append(text)
    return out[:limit]


def _text_embeddings(model, tokenize, texts: Sequence[str], batch: int = 64) -> np.ndarray:
    """[n, E] L2-normalized CLIP embeddings of "a photo of a {text}." (rows padded to a multiple of
    ``batch``, so that every call runs the program compiled once)."""
    from jaxgist.core import arrays
    from jaxgist.evaluation import embeddings

    if not texts:
        return np.zeros((0, model.config.embed_dim), np.float32)
    ids = tokenize([f"a photo of a {t}." for t in texts])
    padded = arrays.pad_rows(ids, math.ceil(len(texts) / batch) * batch)
    return np.asarray(embeddings.encode_texts(model, padded, batch_size=batch)[: len(texts)])  # unit norm already


def coder_knowledge(config, workdir, client):
    from jaxgist.heads import coder
    from jaxgist.models import clip
    from jaxgist.models.clip import tokenizer

    d = config.describe
    names = _class_names(config, workdir)
    domain = _domain(config)
    used = {}

    def ask(name, key_texts, validate, desc):
        prompt = prompts.load(name)
        used[prompt.name] = prompt.version
        requests = [client_lib.Request(key=k, messages=_user(prompt.format(**fields)), validate=validate)
                    for k, fields in key_texts]
        return client.run(requests, desc=desc)

    attributes = ask("coder_attributes", [(str(i), dict(classname=n, domain=domain, n=d.num_attributes))
                                          for i, n in enumerate(names)], answers.string_list(min_items=1),
                     "attributes")
    reader = wordnet() if d.wordnet else None
    if d.wordnet and reader is None:
        logging.info("describe: no WordNet (pip install nltk, and its wordnet corpus): synonyms from the model")
    synonyms: list[list[str]] = []
    need_llm = []
    for i, n in enumerate(names):  # a name WordNet does not know is asked of the model
        found = wordnet_synonyms(reader, n, d.num_synonyms) if reader is not None else []
        synonyms.append(found)
        if not found:
            need_llm.append(i)
    if need_llm:
        for res in ask("coder_synonyms", [(str(i), dict(classname=names[i], domain=domain, n=d.num_synonyms))
                                          for i in need_llm], answers.string_list(min_items=0), "synonyms"):
            if res.ok:
                synonyms[int(res.key)] = [s for s in res.value if s.lower() != names[int(res.key)].lower()][
                    : d.num_synonyms]

    # analogous classes: candidates too close (CLIP text cosine) to a class of the dataset are dropped
    model = clip.from_config(config.model, seed=config.seed)
    tokenize = tokenizer.load(config.model.tokenizer or None)
    class_emb = _text_embeddings(model, tokenize, names)
    analogous: list[list[str]] = [[] for _ in names]
    excluded: list[list[str]] = [[] for _ in names]
    pending = list(range(len(names)))
    rounds_used = 0
    for round_ in range(d.analogous_rounds):
        if not pending:
            break
        rounds_used = round_ + 1
        asked = ask("coder_analogous", [(str(i), dict(classname=names[i], domain=domain, n=d.num_analogous,
                                                      exclude=", ".join([n for j, n in enumerate(names) if j != i]
                                                                        + excluded[i]) or "none"))
                                        for i in pending], answers.string_list(min_items=1),
                    f"analogous classes (round {round_ + 1})")
        still = [int(res.key) for res in asked if not res.ok]
        offered = [(int(res.key), c) for res in asked if res.ok for c in res.value
                   if c not in analogous[int(res.key)] and c not in excluded[int(res.key)]]
        closest = (_text_embeddings(model, tokenize, [c for _, c in offered]) @ class_emb.T).max(axis=1) \
            if offered else []
        for (i, cand), cosine in zip(offered, closest):
            if cosine > d.analogous_max_cosine:  # as good as a class of the dataset: it would confuse them
                excluded[i].append(cand)
            elif len(analogous[i]) < d.num_analogous:
                analogous[i].append(cand)
        still += [int(res.key) for res in asked if res.ok and len(analogous[int(res.key)]) < d.num_analogous]
        pending = still

    # one-vs-one texts for each class's most confusable classes
    sims = class_emb @ class_emb.T
    np.fill_diagonal(sims, -np.inf)
    k = min(d.pairs_per_class, len(names) - 1)
    pairs = sorted({(i, int(j)) for i in range(len(names)) for j in np.argsort(-sims[i])[:k]})
    pair_answers = ask("coder_one_vs_one", [(f"{i},{j}", dict(a=names[i], b=names[j], domain=domain, n=d.pair_texts))
                                            for i, j in pairs], answers.string_list(min_items=1),
                       "one-vs-one differences")
    knowledge = {
        "version": coder.FORMAT_VERSION,
        "classes": [{"name": n, "synonyms": synonyms[i], "attributes": attributes[i].value if attributes[i].ok else [],
                     "analogous": analogous[i]} for i, n in enumerate(names)],
        "pairs": {res.key: list(res.value) for res in pair_answers if res.ok},
    }
    coder.parse_knowledge(knowledge)  # the file the CODER heads read: checked before it is written
    failures = _failures(list(attributes) + list(pair_answers))
    figures = {"classes": len(names), "pairs": len(knowledge["pairs"]), "analogous_rounds": rounds_used,
               "analogous_dropped_too_close": sum(map(len, excluded)),
               "synonyms_from_wordnet": len(names) - len(need_llm), **failures}
    return knowledge, used, figures
