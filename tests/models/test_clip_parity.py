"""Numerical parity of our Flax CLIP with PyTorch references: HF ``CLIPModel`` and OpenAI's clip/model.py."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgist.models import clip  # noqa: E402

ATOL = 1e-5

# (name, vision config, text config, projection_dim)
HF_CONFIGS = [
    ("quick_gelu-p8-argmax",
     dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=128, hidden_act="quick_gelu"),
     dict(vocab_size=99, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
          intermediate_size=64, hidden_act="quick_gelu", eos_token_id=2),
     24),
    ("gelu-p4-eos-id",
     dict(image_size=24, patch_size=4, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
          intermediate_size=96, hidden_act="gelu", layer_norm_eps=1e-6),
     dict(vocab_size=120, max_position_embeddings=20, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
          intermediate_size=80, hidden_act="gelu", eos_token_id=119),
     16),
    ("quick_gelu-p16-wide",
     dict(image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=1, num_attention_heads=6,
          intermediate_size=384, hidden_act="quick_gelu"),
     dict(vocab_size=64, max_position_embeddings=12, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
          intermediate_size=256, hidden_act="quick_gelu", eos_token_id=2),
     32),
]


def make_ids(rng, vocab, length, lengths, eos=None):
    """OpenAI-style ids: random tokens, the end token (the largest id) at position n-1, then 0-padding."""
    eos = vocab - 1 if eos is None else eos
    ids = np.zeros((len(lengths), length), np.int64)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = rng.integers(3, vocab - 2, size=n - 1)
        ids[row, n - 1] = eos
    return ids


def hf_features(out):
    """transformers returns a tensor or a ModelOutput (pooler_output) depending on the version."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def save_random_hf(tmp_path, vision, text, proj, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=proj)
    model = transformers.CLIPModel(cfg).eval()
    # Make the random init less degenerate than HF's tiny-std default, so errors would show.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 0:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("name,vision,text,proj", HF_CONFIGS, ids=[c[0] for c in HF_CONFIGS])
def test_hf_parity(tmp_path, name, vision, text, proj):
    ref = save_random_hf(tmp_path, vision, text, proj)
    ours = clip.load(tmp_path)
    rng = np.random.default_rng(0)
    size = vision["image_size"]
    pixels = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    ctx = text["max_position_embeddings"]
    ids = make_ids(rng, text["vocab_size"], ctx, [2, 5, ctx, ctx // 2])

    with torch.no_grad():
        pt_pix = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        pt_ids = torch.from_numpy(ids)
        ref_img = hf_features(ref.get_image_features(pixel_values=pt_pix)).numpy()
        ref_txt = hf_features(ref.get_text_features(input_ids=pt_ids)).numpy()
        ref_out = ref(input_ids=pt_ids, pixel_values=pt_pix)

    img = np.asarray(ours.encode_image(jnp.asarray(pixels)))
    txt = np.asarray(ours.encode_text(jnp.asarray(ids, jnp.int32)))
    per_image, per_text = ours(jnp.asarray(pixels), jnp.asarray(ids, jnp.int32))
    assert np.abs(ref_img).max() > 0.1 and np.abs(ref_txt).max() > 0.1  # non-degenerate outputs
    np.testing.assert_allclose(img, ref_img, rtol=0, atol=ATOL)
    np.testing.assert_allclose(txt, ref_txt, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(per_image), ref_out.logits_per_image.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(per_text), ref_out.logits_per_text.numpy(), rtol=0, atol=ATOL)


def test_full_hidden_states_match_pooled_fast_path(tmp_path):
    _, vision, text, proj = HF_CONFIGS[0]
    ref = save_random_hf(tmp_path, vision, text, proj)
    ours = clip.load(tmp_path)
    rng = np.random.default_rng(1)
    ids = make_ids(rng, text["vocab_size"], 16, [4, 16, 9])
    with torch.no_grad():
        ref_hidden = ref.text_model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    hidden, _ = ours.text_model(jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, rtol=0, atol=ATOL)


def test_save_hf_round_trip(tmp_path):
    ours = clip.create(dict(vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=96, act="gelu"),
                            text=dict(vocab_size=80, context_length=10, width=32, layers=2, heads=2, mlp_dim=64),
                            embed_dim=20), seed=3)
    clip.save_hf(ours, tmp_path)
    ref = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(2)
    pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = make_ids(rng, 80, 10, [3, 10])
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    per_image, _ = ours(jnp.asarray(pixels), jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(per_image), out.logits_per_image.numpy(), rtol=0, atol=ATOL)
    # And back: loading what we saved gives identical parameters.
    again = clip.load(tmp_path)
    a, b = clip.to_hf_state_dict(ours), clip.to_hf_state_dict(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# OpenAI state dicts against OpenAI's reference model code (clip-anytorch's clip/model.py).
# ---------------------------------------------------------------------------------------------


def openai_model_module():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's reference CLIP code is not installed (pip install --no-deps clip-anytorch)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model.py"
    # Import clip/model.py alone: the package __init__ pulls in torchvision, which the model does not need.
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


OPENAI_CONFIGS = [
    # embed_dim, image_resolution, vision_layers, vision_width, patch, context, vocab, text_width, text_heads, text_layers
    (24, 32, 2, 128, 8, 16, 99, 64, 1, 2),
    (16, 48, 1, 64, 16, 12, 150, 128, 2, 3),
]


@pytest.mark.parametrize("args", OPENAI_CONFIGS)
def test_openai_state_dict_parity(tmp_path, args):
    module = openai_model_module()
    torch.manual_seed(0)
    ref = module.CLIP(*args).eval()
    path = tmp_path / "openai.pt"
    torch.save(ref.state_dict(), path)
    with pytest.raises(clip.UnknownActivation, match=r"openai\.pt: an OpenAI-layout CLIP state dict does not record its "
                                                      r"activation .*--config\.model\.act=quick_gelu or gelu"):
        clip.load(path)  # a plain state dict does not say whether it is OpenAI's (QuickGELU) or a LAION one
    ours = clip.load(path, act="quick_gelu")
    embed, res, _, _, _, ctx, vocab = args[:7]
    assert ours.config.vision.image_size == res and ours.config.embed_dim == embed
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, res, res, 3)).astype(np.float32)
    ids = make_ids(rng, vocab, ctx, [3, ctx, 7])
    with torch.no_grad():
        pt_pix = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        ref_img = ref.encode_image(pt_pix).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(ids)).numpy()
        ref_logits, _ = ref(pt_pix, torch.from_numpy(ids))
    np.testing.assert_allclose(np.asarray(ours.encode_image(jnp.asarray(pixels))), ref_img, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours.encode_text(jnp.asarray(ids, jnp.int32))), ref_txt, rtol=0, atol=ATOL)
    per_image, _ = ours(jnp.asarray(pixels), jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(per_image), ref_logits.numpy(), rtol=0, atol=ATOL)


def test_openai_fp16_checkpoint_wrapped_and_prefixed(tmp_path):
    """GIST-style saves: fp16 weights, a DataParallel 'module.' prefix, inside a training-checkpoint dict."""
    module = openai_model_module()
    torch.manual_seed(1)
    ref = module.CLIP(*OPENAI_CONFIGS[0]).eval()
    module.convert_weights(ref)  # to fp16, as OpenAI's build_model does
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    path = tmp_path / "gist_finetuned.pth"
    torch.save({"epoch": 3, "model_state_dict": sd}, path)
    ours = clip.load(path, dtype=jnp.float32, act="quick_gelu")
    assert ours.logit_scale[...].dtype == jnp.float32
    ref = ref.float()
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(ours.encode_image(jnp.asarray(pixels))), ref_img, rtol=0, atol=ATOL)


def test_pytorch_model_bin_directory(tmp_path):
    """HF directories that hold pytorch_model.bin instead of safetensors load the same weights."""
    _, vision, text, proj = HF_CONFIGS[0]
    ref = save_random_hf(tmp_path / "st", vision, text, proj, seed=7)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
    a = clip.to_hf_state_dict(clip.load(tmp_path / "st"))
    b = clip.to_hf_state_dict(clip.load(bin_dir))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
