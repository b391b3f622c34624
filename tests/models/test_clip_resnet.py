"""CLIP ResNet towers and open_clip checkpoints against OpenAI's reference ``clip/model.py`` (random
weights): features, TorchScript archives and state dicts, fp16, activations, names and bad keys."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxgist.models import clip  # noqa: E402
from jaxgist.models.clip import pretrained, weights  # noqa: E402
from tests.models.test_clip_parity import make_ids, openai_model_module  # noqa: E402

ATOL = 1e-5

# embed_dim, image_resolution, vision_layers, vision_width, patch, context, vocab, text_width, text_heads, text_layers
RN_CONFIGS = [
    (24, 64, (1, 2, 1, 1), 16, None, 16, 99, 64, 1, 2),  # 8 attention-pool heads, stride and downsample paths
    (16, 96, (2, 1, 3, 2), 8, None, 12, 150, 128, 2, 1),  # uneven stage depths (as RN50x4's 4/6/10/6), 3x3 grid
]


def reference(args, seed=0, act=None):
    """OpenAI's CLIP of ``args`` with random BatchNorm affine parameters and running statistics (a fresh
    model's are 1/0/0/1 and bn3 zero-initialized, which would hide errors), in eval mode."""
    module = openai_model_module()
    torch.manual_seed(seed)
    ref = module.CLIP(*args)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    if act == "gelu":  # open_clip's LAION models: nn.GELU where OpenAI has QuickGELU
        for block in list(ref.transformer.resblocks) + list(getattr(getattr(ref.visual, "transformer", None),
                                                                     "resblocks", [])):
            block.mlp.gelu = torch.nn.GELU()
    return ref.eval()


def reference_features(ref, pixels, ids):
    with torch.no_grad():
        img = ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
        txt = ref.encode_text(torch.from_numpy(ids)).numpy()
    return img, txt


def inputs(args, seed=0):
    rng = np.random.default_rng(seed)
    res, ctx, vocab = args[1], args[5], args[6]
    return rng.normal(size=(2, res, res, 3)).astype(np.float32), make_ids(rng, vocab, ctx, [3, ctx])


@pytest.mark.parametrize("args", RN_CONFIGS)
def test_resnet_clip_matches_openai_reference(tmp_path, args):
    ref = reference(args)
    path = tmp_path / "rn.pt"
    torch.save(ref.state_dict(), path)
    ours = clip.load(path, act="quick_gelu")
    cfg = ours.config
    assert cfg.is_resnet and cfg.vision.layers == args[2] and cfg.vision.width == args[3]
    assert cfg.vision.image_size == args[1] and cfg.vision.heads == args[3] * 32 // 64 and cfg.embed_dim == args[0]
    pixels, ids = inputs(args)
    ref_img, ref_txt = reference_features(ref, pixels, ids)
    np.testing.assert_allclose(np.asarray(ours.encode_image(jnp.asarray(pixels))), ref_img, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours.encode_text(jnp.asarray(ids, jnp.int32))), ref_txt, rtol=0, atol=ATOL)


def test_attention_pool_gradients_match_openai_reference(tmp_path):
    """The pool absorbs its key/value projections into the query: the gradients of every pool parameter
    (and of the stem, through the whole tower) must still be the reference's."""
    from flax import nnx

    args = RN_CONFIGS[0]
    ref = reference(args)
    torch.save(ref.state_dict(), tmp_path / "rn.pt")
    ours = clip.load(tmp_path / "rn.pt", act="quick_gelu")
    pixels, _ = inputs(args)
    direction = np.random.default_rng(3).normal(size=(pixels.shape[0], args[0])).astype(np.float32)
    loss = (ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())) * torch.from_numpy(direction)).sum()
    loss.backward()
    grads = nnx.grad(lambda m: jnp.sum(m.encode_image(jnp.asarray(pixels)) * direction))(ours)
    pool, ref_pool = grads["vision_model"]["attnpool"], ref.visual.attnpool
    pairs = {"positional_embedding": (pool["positional_embedding"][...], ref_pool.positional_embedding.grad)}
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        layer = getattr(ref_pool, name)
        pairs[f"{name}.weight"] = (pool[name]["kernel"][...].T, layer.weight.grad)
        pairs[f"{name}.bias"] = (pool[name]["bias"][...], layer.bias.grad)
    pairs["conv1.weight"] = (grads["vision_model"]["conv1"]["kernel"][...].transpose(3, 2, 0, 1), ref.visual.conv1.weight.grad)
    for name, (got, want) in pairs.items():
        want = want.numpy()
        scale = max(float(np.abs(want).max()), 1e-3)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * scale, err_msg=name)
    # the value bias gets a gradient well above the tolerance, so the comparison above tests it
    assert float(np.abs(np.asarray(pool["v_proj"]["bias"][...])).max()) > 1e-3


def test_torchscript_archive_and_state_dict_give_identical_parameters(tmp_path):
    """OpenAI released its checkpoints as TorchScript archives: they load (QuickGELU without being told)
    to exactly the parameters of the same weights' state dict."""
    args = RN_CONFIGS[0]
    ref = reference(args, seed=3)
    pixels, ids = inputs(args)
    scripted = torch.jit.trace(ref, (torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids)),
                               check_trace=False)
    torch.jit.save(scripted, str(tmp_path / "RN.pt"))
    torch.save(ref.state_dict(), tmp_path / "rn_state_dict.pt")
    a = clip.to_hf_state_dict(clip.load(tmp_path / "RN.pt"))
    b = clip.to_hf_state_dict(clip.load(tmp_path / "rn_state_dict.pt", act="quick_gelu"))
    assert a.keys() == b.keys() and "vision_model.layer1.0.bn1.running_var" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_fp16_resnet_checkpoint_loads(tmp_path):
    args = RN_CONFIGS[1]
    module = openai_model_module()
    ref = reference(args, seed=5)
    module.convert_weights(ref)  # conv, linear and attention weights to fp16, as OpenAI's build_model does
    assert ref.visual.conv1.weight.dtype == torch.float16
    torch.save(ref.state_dict(), tmp_path / "rn_fp16.pt")
    ours = clip.load(tmp_path / "rn_fp16.pt", act="quick_gelu", dtype=jnp.float32)
    kernel = ours.vision_model.layer1[0].conv1.kernel[...]
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kernel), ref.visual.layer1[0].conv1.weight.detach().float().numpy()
                                  .transpose(2, 3, 1, 0))
    ref = ref.float()
    pixels, ids = inputs(args)
    ref_img, _ = reference_features(ref, pixels, ids)
    np.testing.assert_allclose(np.asarray(ours.encode_image(jnp.asarray(pixels))), ref_img, rtol=0, atol=ATOL)


def test_open_clip_state_dict_takes_its_activation_from_open_clip_config(tmp_path):
    """A LAION-style state dict (OpenAI's layout, GELU) with open_clip's config beside it loads with GELU
    and matches; the same weights forced to QuickGELU do not."""
    args = (16, 32, 2, 64, 8, 12, 99, 64, 1, 2)  # a ViT-B-style tiny model
    ref = reference(args, seed=2, act="gelu")
    folder = tmp_path / "laion"
    folder.mkdir()
    torch.save(ref.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16}}))
    pixels, ids = inputs(args)
    ref_img, ref_txt = reference_features(ref, pixels, ids)
    ours = clip.load(folder / "open_clip_pytorch_model.bin")
    assert ours.config.text.act == ours.config.vision.act == "gelu"
    np.testing.assert_allclose(np.asarray(ours.encode_image(jnp.asarray(pixels))), ref_img, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours.encode_text(jnp.asarray(ids, jnp.int32))), ref_txt, rtol=0, atol=ATOL)
    forced = clip.load(folder / "open_clip_pytorch_model.bin", act="quick_gelu")
    assert np.abs(np.asarray(forced.encode_text(jnp.asarray(ids, jnp.int32))) - ref_txt).max() > 1e-3
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert clip.read_config(folder / "open_clip_pytorch_model.bin").text.act == "quick_gelu"


def test_bad_resnet_checkpoints_list_every_problem(tmp_path):
    args = RN_CONFIGS[0]
    sd = reference(args).state_dict()
    del sd["visual.attnpool.k_proj.weight"]
    sd["visual.layer2.0.bn1.weight"] = sd["visual.layer2.0.bn1.weight"][:3]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(clip.CheckpointMismatchError) as e:
        clip.load(tmp_path / "broken.pt", act="quick_gelu")
    message = str(e.value)
    assert "1 missing key(s)" in message and "vision_model.attnpool.k_proj.weight" in message
    assert "vision_model.layer2.0.bn1.weight: checkpoint (3,), model expects (32,)" in message
    # the same weights into a model of other stage depths: every extra block is named
    cfg = weights.config_from_openai(reference(args).state_dict(), act="quick_gelu")
    fewer = cfg.replace(vision=clip.ResNetConfig(image_size=64, layers=(1, 1, 1, 1), width=16))
    with pytest.raises(clip.CheckpointMismatchError, match=r"unexpected key\(s\):\n    vision_model\.layer2\.1\.bn1"):
        clip.from_hf_state_dict(fewer, weights.openai_to_hf(reference(args).state_dict()))


def test_names_resolve_to_architectures_without_downloading():
    rn50 = clip.read_config("RN50")
    assert rn50.is_resnet and rn50.vision.layers == (3, 4, 6, 3) and rn50.vision.heads == 32 and rn50.embed_dim == 1024
    assert clip.read_config("RN50x4").vision.image_size == 288 and clip.PRESETS["RN50x64"].vision.layers == (3, 15, 36, 10)
    laion = clip.read_config("ViT-B-32/laion2b_s34b_b79k")
    assert laion.text.act == laion.vision.act == "gelu" and laion.vision.patch_size == 32
    assert clip.read_config("ViT-B-32-quickgelu/laion400m_e32").text.act == "quick_gelu"
    assert clip.read_config("RN50/yfcc15m").text.act == "quick_gelu"
    entry = pretrained.lookup("RN50")
    assert entry.sha256 == "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
    assert pretrained.lookup("ViT-L-14:laion2b_s32b_b82k").mean == pretrained.INCEPTION_MEAN


def test_an_unreachable_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGIST_CACHE", str(tmp_path))
    entry = pretrained.Pretrained(name="RN50", act="quick_gelu", url="http://127.0.0.1:9/clip/RN50.pt")
    with pytest.raises(FileNotFoundError, match=r"downloading http://127\.0\.0\.1:9/clip/RN50\.pt failed"):
        pretrained.download(entry.url)
    assert not list(tmp_path.rglob("*.part-*"))  # nothing half-written is left
    with pytest.raises(FileNotFoundError, match=r"laion/CLIP-ViT-B-32-laion2B-s34B-b79K.*HF hub failed"):
        clip.load("ViT-B-32/laion2b_s34b_b79k")  # the tests run with HF_HUB_OFFLINE=1


def test_batchnorm_trains_with_batch_statistics_and_pytorch_running_ones():
    """model.train(): batch statistics and PyTorch's running update (unbiased variance); eval: running."""
    from jaxgist.models.layers import BatchNorm

    x = np.random.default_rng(0).normal(size=(4, 5, 3, 6)).astype(np.float32) * 2 + 1
    ours = BatchNorm(6)
    ref = torch.nn.BatchNorm2d(6, momentum=0.1, eps=1e-5).train()
    y = np.asarray(ours(jnp.asarray(x)))
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.var[...]), ref.running_var.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.mean[...]), ref.running_mean.numpy(), atol=1e-6)
    ref.eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), use_running_average=True)), want, atol=1e-5)


@pytest.mark.slow
def test_finetuning_a_resnet_clip_updates_its_batch_statistics():
    """The contrastive step runs BatchNorm in training mode and carries the new running statistics in
    the train state (sharded over data x fsdp like the rest)."""
    from jaxgist.methods import finetune, finetune_step
    from jaxgist.training import parallel

    c = finetune.default_config()
    c.model.init = ""
    c.model.preset = dict(vision=dict(image_size=64, layers=[1, 1, 1, 1], width=8),
                          text=dict(width=32, layers=1, heads=2, mlp_dim=64, context_length=16), embed_dim=16)
    c.mesh = (("data", 4), ("fsdp", 2))
    c.train.global_batch = 8
    mesh = parallel.make_mesh(c.mesh)
    setup = finetune_step.build(c, mesh, 2, model_cfg=clip.config_from_model_config(c.model))
    state = setup.init_state(clip.from_config(c.model))
    before = jax.device_get(state.models["clip"]["vision_model"]["bn1"]["var"][...])
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 64, 64, 3)).astype(np.float32),
             "ids": make_ids(rng, 49408, 16, [4] * 8).astype(np.int32)}
    batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    state, metrics = setup.step(state, batch)
    after = jax.device_get(state.models["clip"]["vision_model"]["bn1"]["var"][...])
    assert np.isfinite(float(metrics["loss"])) and not np.allclose(before, after)


def test_a_checkpoint_trained_with_other_image_statistics_gets_the_pipelines_pixels_mapped_to_them(tmp_path):
    """open_clip's ViT-L-14/laion2b_s32b_b82k was trained on images normalized with mean = std = 0.5: its
    config says so, and the model maps the pipeline's OpenAI-normalized pixels to that at the input."""
    from configs import common
    from jaxgist.models.clip import model as clip_model

    laion = clip.read_config("ViT-L-14/laion2b_s32b_b82k")
    assert laion.image_mean == laion.image_std == (0.5, 0.5, 0.5)
    assert clip.read_config("ViT-B-32/laion2b_s34b_b79k").image_mean == clip_model.OPENAI_MEAN
    base = clip.create(common.TINY_CLIP, seed=4)
    other = clip.create(base.config.replace(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)), seed=4)
    raw = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    openai = (raw - np.asarray(clip_model.OPENAI_MEAN, np.float32)) / np.asarray(clip_model.OPENAI_STD, np.float32)
    ours = np.asarray(other.encode_image(jnp.asarray(openai)))
    want = np.asarray(base.encode_image(jnp.asarray((raw - 0.5) / 0.5)))
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(base.encode_image(jnp.asarray(openai))) - want).max() > 1e-3  # the map matters
    # an HF directory keeps its statistics in preprocessor_config.json
    saved = clip.save_hf(other, tmp_path / "hf")
    assert clip.read_config(saved).image_std == (0.5, 0.5, 0.5)
    np.testing.assert_allclose(np.asarray(clip.load(saved).encode_image(jnp.asarray(openai))), want, rtol=0, atol=1e-5)
