"""CgT-GAN's CLIP-aggregated targets (``jaxgist.methods.clip_aggregate``) against the float64 reference,
a torch transcription of CgT-GAN's ``preprocess/generate_embedding.py`` loop, and on disk."""

import json
import os
import threading

import numpy as np
import pytest

from jaxgist.data import embedding_store
from jaxgist.methods import clip_aggregate as ca

N, M, D = 37, 1000, 16
# Error budget of ours (float32) against float64: t * cos (up to 175) amplifies the ~1e-7 relative
# rounding of the float32 cosine; measured max |diff| ~1e-5 x the largest |target|.
RTOL = 1e-5
ATOL_SCALE = 1e-5


def make_data(n=N, m=M, d=D, seed=0):
    """CLIP-like embeddings: a shared direction plus noise (cosines concentrated, so many sentences share
    the weight), corpus rows of varied norms (the weighted sum uses the unnormalized rows)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=d)
    images = (rng.normal(size=(n, d)) + 3.0 * shared).astype(np.float32)
    corpus = (rng.normal(size=(m, d)) + 3.0 * shared) * rng.uniform(0.3, 3.0, size=(m, 1))
    return images, corpus.astype(np.float32)


def assert_close(ours, expected, rtol=RTOL, atol_scale=ATOL_SCALE):
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=atol_scale * np.abs(expected).max())


@pytest.fixture(scope="module")
def data():
    return make_data()


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [100.0, 125.0, 175.0])
def test_matches_the_float64_reference(data, temperature):
    images, corpus = data
    # corpus_block 300 does not divide M = 1000 (a padded, masked last block); image_block 10 does not divide 37
    ours = ca.aggregate(images, corpus, temperature, image_block=10, corpus_block=300)
    expected = ca.reference_aggregate(images, corpus, temperature)
    assert ours.dtype == np.float32 and ours.shape == (N, D)
    assert_close(ours, expected)
    # the weights are spread (not one-hot): the test sees the whole softmax, not just the argmax
    cos = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ (corpus / np.linalg.norm(corpus, axis=1,
                                                                                           keepdims=True)).T
    w = np.exp(temperature * (cos - cos.max(axis=1, keepdims=True)))
    w /= w.sum(axis=1, keepdims=True)
    assert np.median(1 / (w ** 2).sum(axis=1)) > 3  # effective number of sentences per image
    # and the unnormalized rows matter: normalizing them first would give another answer
    assert not np.allclose(ours, w @ (corpus / np.linalg.norm(corpus, axis=1, keepdims=True)), atol=1e-2)


def torch_generate_embedding(img_data, cap_data, t):
    """CgT-GAN's ``generate_embedding.py`` loop, line by line (CPU instead of CUDA), before its float16 cast."""
    import torch

    img_data, cap_data = torch.from_numpy(img_data), torch.from_numpy(cap_data)
    img_data_norm = img_data / img_data.norm(dim=1, keepdim=True)
    cap_data_norm = cap_data / cap_data.norm(dim=1, keepdim=True)
    cap_data_norm = cap_data_norm.to(torch.float64)
    out = []
    for i in range(len(img_data)):
        with torch.no_grad():
            img_emb_norm = img_data_norm[i].reshape(1, -1).to(torch.float64)
            similarity_matrix = (img_emb_norm * cap_data_norm).sum(-1)
            weight_matrix = torch.exp(similarity_matrix * t)
            weight_sum = weight_matrix.sum().item()
            weight_matrix = (weight_matrix / weight_sum).reshape(-1, 1)
            generate_emb = (cap_data * weight_matrix).sum(0)
            out.append(generate_emb)
    return torch.stack(out).numpy()


@pytest.mark.parametrize("temperature", [100, 175])
def test_matches_a_torch_transcription_of_cgtgan(data, temperature):
    images, corpus = data
    expected = torch_generate_embedding(images[:5], corpus, temperature)
    assert expected.dtype == np.float64  # float32 corpus x float64 weights: promoted, as on the GPU
    ours = ca.aggregate(images[:5], corpus, temperature, corpus_block=256)
    assert_close(ours, expected)
    # the NumPy reference is the same formula (it normalizes in float64, the script in float32)
    assert_close(ca.reference_aggregate(images[:5], corpus, temperature), expected)


def test_block_sizes_and_a_memory_map_do_not_change_the_result(data, tmp_path):
    images, corpus = data
    results = [ca.aggregate(images, corpus, 175.0, image_block=ib, corpus_block=cb)
               for ib, cb in [(37, 1000), (64, 4096), (8, 128), (5, 999), (36, 7)]]
    for r in results[1:]:
        assert_close(r, results[0], rtol=5e-6, atol_scale=5e-6)  # float32 summation order only
    np.save(tmp_path / "corpus.npy", corpus)
    mapped = np.load(tmp_path / "corpus.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(ca.aggregate(images, mapped, 175.0, image_block=5, corpus_block=999), results[3])
    assert np.array_equal(mapped[123], corpus[123])  # the memmap is still readable after its pages were released
    # float16 inputs (what CLIP on CUDA stores) are read as float32
    half = ca.aggregate(images.astype(np.float16), corpus.astype(np.float16), 175.0, corpus_block=300)
    assert_close(half, ca.reference_aggregate(images.astype(np.float16), corpus.astype(np.float16), 175.0))


def test_extreme_similarities_stay_finite():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(6, D)).astype(np.float32)
    corpus = rng.normal(size=(200, D)).astype(np.float32)
    corpus[10:16] = 4.0 * images  # cos = 1 with every image: exp(175 * 1) overflows float32
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(np.float32(175.0)))
    ours = ca.aggregate(images, corpus, 175.0, corpus_block=64)
    assert np.isfinite(ours).all()
    assert_close(ours, ca.reference_aggregate(images, corpus, 175.0))
    # a temperature that overflows even float64: the reference gives NaN, ours the softmax limit (the argmax)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isnan(ca.reference_aggregate(images, corpus, 1000.0)).all()
    np.testing.assert_allclose(ca.aggregate(images, corpus, 1000.0, corpus_block=64), corpus[10:16], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------

def _bad(images, corpus, **kw):
    return ca.aggregate(images, corpus, kw.pop("temperature", 100.0), corpus_block=300, **kw)


@pytest.mark.parametrize("change, message", [
    (lambda x, c: (x, c[:0]), "corpus_embeddings is empty"),
    (lambda x, c: (x, c[:, :8]), "image_embeddings are 16-d but corpus_embeddings are 8-d"),
    (lambda x, c: (x, c[0]), "corpus_embeddings must be a 2-d array"),
    (lambda x, c: (np.where(np.arange(N)[:, None] == 3, 0, x), c), "image_embeddings row 3 has zero norm"),
    (lambda x, c: (x, np.where(np.arange(M)[:, None] == 500, 0, c)), "corpus_embeddings row 500 has zero norm"),
    (lambda x, c: (x, np.where((np.arange(M)[:, None] == 999) & (np.arange(D) == 2), np.nan, c)),
     r"corpus_embeddings row 999 has a non-finite value \(nan\)"),
    (lambda x, c: (np.where(np.arange(N)[:, None] == 36, np.inf, x), c),
     r"image_embeddings row 36 has a non-finite value \(inf\)"),
    (lambda x, c: (x, np.where(np.arange(M)[:, None] == 7, 1e30, c)), "corpus_embeddings row 7 has a norm too large"),
])
def test_bad_inputs_are_named(data, change, message):
    images, corpus = change(*data)
    with pytest.raises(ValueError, match=message):
        _bad(images, corpus)


@pytest.mark.parametrize("temperature", [0.0, -100.0, float("nan"), float("inf"), "100", True])
def test_bad_temperatures(data, temperature):
    with pytest.raises(ValueError, match="temperature must be a positive"):
        _bad(*data, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        ca.write_targets("/nonexistent", [str(i) for i in range(N)], *data, temperature)


@pytest.mark.parametrize("kw", [{"image_block": 0}, {"image_block": 2.5}])
def test_bad_block_sizes(data, kw):
    with pytest.raises(ValueError, match="image_block must be a positive integer"):
        _bad(*data, **kw)


# ------------------------------------------------------------------------------------------------
# write_targets
# ------------------------------------------------------------------------------------------------

KEYS = [f"img_{(i * 7) % N:03d}.jpg" for i in range(N)]  # not sorted: rows are found by key


class Counting:
    """``aggregate`` counting its calls, raising on call number ``fail_at`` (an interrupted job)."""

    real = staticmethod(ca.aggregate)

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        return self.real(*args, **kw)


def parts_in(directory):
    return sorted(p for p in os.listdir(directory / "parts") if p.startswith("part-"))


def test_write_targets_writes_a_store_keyed_by_image(data, tmp_path):
    images, corpus = data
    summary = ca.write_targets(tmp_path / "t", KEYS, images, corpus, 125.0, part_size=8, progress=True,
                               corpus_block=300)
    assert summary["parts"] == 5 and summary["parts_computed"] == 5 and summary["images"] == N
    assert summary["dim"] == D and summary["corpus"] == M and summary["temperature"] == 125.0
    store = embedding_store.EmbeddingStore(tmp_path / "t")
    expected = ca.aggregate(images, corpus, 125.0, corpus_block=300)
    for i in (0, 9, 36):
        np.testing.assert_allclose(store.vector(KEYS[i]), expected[i], rtol=1e-6, atol=1e-6)
    assert store.keys == KEYS
    assert parts_in(tmp_path / "t") == []  # parts removed; meta.json stays and describes the store
    meta = json.loads((tmp_path / "t" / "parts" / "meta.json").read_text())
    assert meta["temperature"] == 125.0 and meta["corpus"] == M and meta["images"] == N
    # a rerun of a finished job computes nothing
    counting = Counting()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ca, "aggregate", counting)
        assert ca.write_targets(tmp_path / "t", KEYS, images, corpus, 125.0, part_size=8)["parts_computed"] == 0
    assert counting.calls == 0


def test_an_interrupted_job_resumes_with_the_missing_parts(data, tmp_path, monkeypatch):
    images, corpus = data
    ca.write_targets(tmp_path / "whole", KEYS, images, corpus, 100.0, part_size=8, corpus_block=300)
    whole = np.load(tmp_path / "whole" / embedding_store.ARRAY)

    monkeypatch.setattr(ca, "aggregate", Counting(fail_at=3))
    with pytest.raises(RuntimeError, match="interrupted"):
        ca.write_targets(tmp_path / "t", KEYS, images, corpus, 100.0, part_size=8, corpus_block=300)
    assert parts_in(tmp_path / "t") == ["part-00000.npy", "part-00001.npy"]
    assert not embedding_store.exists(tmp_path / "t")

    # other inputs refuse to mix with these parts
    with pytest.raises(ValueError, match=r"temperature 100.0 -> 125.0.*delete the directory"):
        ca.write_targets(tmp_path / "t", KEYS, images, corpus, 125.0, part_size=8)
    with pytest.raises(ValueError, match="fingerprint.*delete the directory"):
        ca.write_targets(tmp_path / "t", KEYS, images, corpus[::-1], 100.0, part_size=8)
    with pytest.raises(ValueError, match="part_size 8 -> 16"):
        ca.write_targets(tmp_path / "t", KEYS, images, corpus, 100.0, part_size=16)

    # a damaged part is computed again
    np.save(tmp_path / "t" / "parts" / "part-00001.npy", np.zeros((3, D), np.float32))
    counting = Counting()
    monkeypatch.setattr(ca, "aggregate", counting)
    summary = ca.write_targets(tmp_path / "t", KEYS, images, corpus, 100.0, part_size=8, corpus_block=300)
    assert counting.calls == 4 and summary["parts_computed"] == 4  # parts 1 (damaged), 2, 3, 4
    np.testing.assert_array_equal(np.load(tmp_path / "t" / embedding_store.ARRAY), whole)
    # a finished store with other inputs refuses too
    with pytest.raises(ValueError, match="temperature 100.0 -> 175.0"):
        ca.write_targets(tmp_path / "t", KEYS, images, corpus, 175.0, part_size=8)


def test_processes_share_the_parts(data, tmp_path, monkeypatch):
    """Process p of P computes parts p, p + P, ...; process 0 assembles once all are there. Two threads
    play two processes, with a barrier for ``parallel.sync``."""
    images, corpus = data
    barrier, local = threading.Barrier(2, timeout=120), threading.local()
    synced = []
    monkeypatch.setattr(ca.parallel, "sync", lambda name: (synced.append(name), barrier.wait()))
    monkeypatch.setattr(ca.jax, "process_count", lambda: 2)
    monkeypatch.setattr(ca.jax, "process_index", lambda: local.index)
    calls = {0: 0, 1: 0}

    def counting(*args, **kw):
        calls[local.index] += 1
        return Counting.real(*args, **kw)

    monkeypatch.setattr(ca, "aggregate", counting)
    results, errors = {}, []

    def process(index):
        local.index = index
        try:
            results[index] = ca.write_targets(tmp_path / "t", KEYS, images, corpus, 100.0, part_size=8,
                                              corpus_block=300)
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert calls == {0: 3, 1: 2}  # parts 0, 2, 4 and 1, 3
    assert results[0]["parts_computed"] == 3 and results[1]["parts_computed"] == 2
    assert parts_in(tmp_path / "t") == [] and synced.count("jaxgist clip aggregate: store written") == 2
    expected = Counting.real(images, corpus, 100.0, corpus_block=300)
    np.testing.assert_allclose(embedding_store.EmbeddingStore(tmp_path / "t").array, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keys, message", [
    (KEYS[:-1], "36 keys for 37 image embeddings"),
    (KEYS[:-1] + KEYS[:1], "duplicate keys"),
    ([], "no images"),
])
def test_write_targets_bad_keys(data, tmp_path, keys, message):
    with pytest.raises(ValueError, match=message):
        ca.write_targets(tmp_path / "t", keys, *data, 100.0)
    assert not (tmp_path / "t").exists()  # nothing computed or written


def test_write_targets_refuses_a_store_it_did_not_write(data, tmp_path):
    images, corpus = data
    embedding_store.write(tmp_path / "t", KEYS, images)
    with pytest.raises(ValueError, match="did not write"):
        ca.write_targets(tmp_path / "t", KEYS, images, corpus, 100.0)


def test_write_targets_refuses_parts_of_unknown_inputs(data, tmp_path):
    images, corpus = data
    (tmp_path / "t" / "parts").mkdir(parents=True)
    np.save(tmp_path / "t" / "parts" / "part-00000.npy", np.zeros((8, D), np.float32))
    with pytest.raises(ValueError, match="holds parts but no meta.json"):
        ca.write_targets(tmp_path / "t", KEYS, images, corpus, 100.0, part_size=8)
