"""DeiT (timm's VisionTransformer): parity with HF ViTForImageClassification and a timm-named torch ViT,
checkpoint conversion both ways, stochastic depth, errors, logical axes and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgist.models import deit  # noqa: E402
from jaxgist.models.clip import pretrained  # noqa: E402
from jaxgist.models.deit import weights  # noqa: E402
from tests.models.torch_weights import perturb  # noqa: E402

ATOL = 1e-4
TINY = dict(image_size=32, patch=8, width=32, depth=2, heads=4, num_classes=5)


@nnx.jit
def forward(model, x, rngs=None):
    """The model's logits, jitted (one compile per model structure instead of one per eager op)."""
    return model(x, rngs=rngs)


def pixels(batch=3, size=32, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------
# A compact ViT in PyTorch under timm's parameter names (written here: timm needs torchvision)
# ---------------------------------------------------------------------------------------------


class TorchAttention(torch.nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights_ = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((weights_ @ v).transpose(1, 2).reshape(b, n, d))


class TorchMlp(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TorchBlock(torch.nn.Module):
    def __init__(self, dim, heads, hidden, qkv_bias):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = TorchAttention(dim, heads, qkv_bias)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TorchMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchViT(torch.nn.Module):
    def __init__(self, image, patch, dim, depth, heads, classes, mlp_ratio=4, qkv_bias=True):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = torch.nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = torch.nn.ModuleList(
            [TorchBlock(dim, heads, int(dim * mlp_ratio), qkv_bias) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def torch_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(image=32, patch=8, dim=32, depth=2, heads=4, classes=5)
    args.update(kw)
    return perturb(TorchViT(**args).eval(), seed)


def hf_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", num_labels=5)
    args.update(kw)
    config = transformers.ViTConfig(**args)
    return perturb(transformers.ViTForImageClassification(config).eval(), seed), config


def torch_logits(module, x):
    with torch.no_grad():
        out = module(nchw(x))
    return (out if isinstance(out, torch.Tensor) else out.logits).numpy()


# ---------------------------------------------------------------------------------------------
# (a, b) parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_vit_parity():
    ref, config = hf_vit()
    x = pixels()
    model = deit.from_hf_state_dict(ref.state_dict(), config)
    assert model.config.num_classes == 5 and model.config.eps == 1e-6
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), torch_logits(ref, x), rtol=0, atol=ATOL)


def test_hf_hub_layout_parity_and_save_for_transformers(tmp_path):
    """Our HF export uses the hub files' names (encoder.layer.N.attention.attention.query): transformers
    loads it, and so do we, from a directory as from the state dict of transformers 5's layout."""
    from safetensors.numpy import save_file

    ref, config = hf_vit(seed=1, qkv_bias=False)
    x = pixels(seed=1)
    want = torch_logits(ref, x)
    model = deit.from_hf_state_dict(ref.state_dict(), config.to_dict())
    hub = deit.to_hf_state_dict(model)
    assert "vit.encoder.layer.1.attention.attention.query.weight" in hub
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(config.to_json_string())
    again = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(again, x), want, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(deit.load(tmp_path)(jnp.asarray(x))), want, rtol=0, atol=ATOL)


def test_bare_vit_model_loads_as_a_backbone(tmp_path):
    """A ViTModel checkpoint (no ``vit.`` prefix, a pooler, no classifier): no head unless asked for."""
    torch.manual_seed(3)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, layer_norm_eps=1e-6)
    ref = perturb(transformers.ViTModel(config).eval(), 3)
    ref.save_pretrained(tmp_path)
    x = pixels(seed=3)
    with torch.no_grad():
        want = ref(pixel_values=nchw(x)).last_hidden_state[:, 0].numpy()
    backbone = deit.load(tmp_path)
    assert backbone.head is None and backbone.config.num_classes == 0
    np.testing.assert_allclose(np.asarray(backbone(jnp.asarray(x))), want, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="no classifier head.*reset_head=True"):
        deit.load(tmp_path, num_classes=3)
    assert deit.load(tmp_path, num_classes=3, reset_head=True).head.kernel[...].shape == (32, 3)


@pytest.mark.parametrize("kw,cfg", [
    (dict(dim=64, heads=1, mlp_ratio=2), None),  # heads inferred as width / 64
    (dict(dim=32, heads=4, qkv_bias=False), dict(heads=4)),
], ids=["inferred", "explicit-heads"])
def test_timm_parity(kw, cfg):
    ref = torch_vit(**kw)
    x = pixels()
    model = deit.from_timm_state_dict(ref.state_dict(), **(cfg or {}))
    assert model.config.width == kw["dim"] and model.config.heads == kw["heads"]
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(x))), torch_logits(ref, x), rtol=0, atol=ATOL)


def test_deit_file_with_model_wrapper_loads_by_path_and_by_name(tmp_path, monkeypatch):
    ref = torch_vit(seed=2)
    x = pixels(seed=2)
    file = tmp_path / "deit_tiny_checkpoint.pth"
    torch.save({"model": ref.state_dict()}, file)  # how facebookresearch's files hold it
    want = torch_logits(ref, x)
    np.testing.assert_allclose(np.asarray(deit.load(file, heads=4)(jnp.asarray(x))), want, rtol=0, atol=ATOL)
    monkeypatch.setitem(weights.DEIT_URLS, "deit_tiny", "https://example.invalid/deit/tiny.pth")
    monkeypatch.setattr(pretrained, "download", lambda url, sha256="": file)
    np.testing.assert_allclose(np.asarray(deit.load("deit_tiny", heads=4)(jnp.asarray(x))), want, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# (c) round trips, heads, numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_timm_round_trip_is_identical():
    model = deit.create(TINY, seed=3)
    sd = deit.to_timm_state_dict(model)
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
    assert sd["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert sd["pos_embed"].shape == (1, 17, 32) and sd["cls_token"].shape == (1, 1, 32)
    again = deit.from_timm_state_dict(sd, heads=4)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    sd2 = deit.to_timm_state_dict(again)
    assert sd2.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k], err_msg=k)
    hf = deit.to_hf_state_dict(model)
    via_hf = deit.to_timm_state_dict(deit.from_hf_state_dict(hf, deit_to_hf_config(model.config)))
    for k in sd:
        np.testing.assert_array_equal(sd[k], via_hf[k], err_msg=k)


def deit_to_hf_config(cfg):
    return dict(model_type="vit", hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                intermediate_size=cfg.mlp_dim, image_size=cfg.image_size, patch_size=cfg.patch, layer_norm_eps=cfg.eps,
                id2label={str(i): str(i) for i in range(cfg.num_classes)})


def test_num_classes_needs_reset_head(tmp_path):
    ref = torch_vit(seed=4)
    file = tmp_path / "ckpt.pth"
    torch.save(ref.state_dict(), file)
    with pytest.raises(ValueError, match="5 classes.*reset_head=True"):
        deit.load(file, heads=4, num_classes=7)
    base = deit.load(file, heads=4)
    fresh = deit.load(file, heads=4, num_classes=7, reset_head=True, seed=1)
    x = jnp.asarray(pixels())
    assert fresh(x).shape == (3, 7) and fresh.config.num_classes == 7
    np.testing.assert_array_equal(np.asarray(fresh.features(x)), np.asarray(base.features(x)))
    assert 0.01 < float(jnp.std(fresh.head.kernel[...])) < 0.03  # trunc_normal(.02)
    assert not np.any(np.asarray(fresh.head.bias[...]))
    backbone = deit.load(file, heads=4, num_classes=0)  # no head: __call__ gives the features
    assert backbone.head is None
    np.testing.assert_array_equal(np.asarray(backbone(x)), np.asarray(base.features(x)))


def test_presets_init_and_bf16():
    assert deit.resolve_config("deit_base_patch16_224") == deit.PRESETS["deit_b"]
    assert deit.resolve_config("deit_b_384").image_size == 384
    cfg = deit.resolve_config("deit_small")
    assert (cfg.width, cfg.depth, cfg.heads, cfg.eps, cfg.mlp_dim) == (384, 12, 6, 1e-6, 1536)
    with pytest.raises(ValueError, match="not divisible"):
        deit.DeiTConfig(width=30, heads=4)
    model = deit.create(TINY, seed=5)
    assert model.feature_dim == 32 and model.deterministic and model.blocks[0].deterministic
    assert float(model.norm.scale[...].min()) == 1.0 and not np.any(np.asarray(model.blocks[0].attn.qkv.bias[...]))
    assert 0.015 < float(jnp.std(model.blocks[0].mlp.fc1.kernel[...])) < 0.025
    assert 0.015 < float(jnp.std(model.pos_embed[...])) < 0.025
    x = jnp.asarray(pixels())
    fp32 = np.asarray(model(x))
    low = deit.create(TINY, seed=5, dtype=jnp.bfloat16)
    assert low.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32
    out = np.asarray(forward(low, x))
    assert out.dtype == np.float32 and np.allclose(out, fp32, atol=0.05) and not np.allclose(out, fp32, atol=1e-6)
    with pytest.raises(ValueError, match="positions for 16"):
        model(jnp.zeros((1, 48, 48, 3)))


# ---------------------------------------------------------------------------------------------
# (d) stochastic depth and dropout
# ---------------------------------------------------------------------------------------------


def test_eval_ignores_rngs_and_train_draws_from_them():
    model = deit.create(TINY, seed=6, drop_path=0.5, dropout=0.1)
    assert model.config.drop_path_rates == (0.0, 0.5)
    x = jnp.asarray(pixels())
    ref = np.asarray(model(x))
    for seed in (1, 2):
        np.testing.assert_array_equal(np.asarray(model(x, rngs=nnx.Rngs(dropout=seed))), ref)
    model.train()
    assert not model.deterministic and not model.blocks[1].deterministic
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        model(x)
    a1, a2 = np.asarray(forward(model, x, nnx.Rngs(dropout=1))), np.asarray(forward(model, x, nnx.Rngs(dropout=1)))
    b = np.asarray(forward(model, x, nnx.Rngs(dropout=2)))
    np.testing.assert_array_equal(a1, a2)
    assert not np.allclose(a1, b) and not np.allclose(a1, ref)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x, rngs=nnx.Rngs(dropout=1))), ref)

    plain = deit.create(TINY, seed=6)  # rates 0: training mode is the same function, and needs no rngs
    want = np.asarray(plain(x))
    plain.train()
    np.testing.assert_array_equal(np.asarray(plain(x)), want)


def test_drop_path_drops_whole_samples_at_the_rate():
    rate, n = 0.3, 100_000
    out = np.asarray(deit.drop_path(jnp.ones((n, 2, 3)), rate, jax.random.key(0)))
    per_sample = out.reshape(n, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    values = np.unique(per_sample)
    assert len(values) == 2 and values[0] == 0.0 and np.isclose(values[1], 1 / (1 - rate))
    dropped = float(np.mean(per_sample[:, 0] == 0))
    assert abs(dropped - rate) < 0.01  # 7 standard deviations (0.00145), and the seed is fixed
    np.testing.assert_array_equal(np.asarray(deit.drop_path(jnp.ones((4, 2)), rate, None)), np.ones((4, 2)))


def test_model_drops_residual_branches_per_sample():
    """Block 1 (rate r) with a zero MLP branch: a sample whose attention branch was dropped comes out
    exactly as from the model with that branch zeroed; the others as with it scaled by 1 / (1 - r)."""
    r, n = 0.5, 2000
    model = deit.create(TINY, seed=7, drop_path=r)
    for leaf in ("kernel", "bias"):
        var = getattr(model.blocks[1].mlp.fc2, leaf)
        var[...] = jnp.zeros_like(var[...])
    x = jnp.asarray(np.repeat(pixels(batch=1, seed=7), n, axis=0))

    def variant(scale):
        m = nnx.clone(model)
        for leaf in ("kernel", "bias"):
            var = getattr(m.blocks[1].attn.proj, leaf)
            var[...] = var[...] * scale
        return np.asarray(forward(m, x))

    dropped_ref, kept_ref = variant(0.0), variant(1 / (1 - r))
    model.train()
    out = np.asarray(forward(model, x, nnx.Rngs(dropout=0)))
    dropped = np.abs(out - dropped_ref).max(-1) < 1e-5
    kept = np.abs(out - kept_ref).max(-1) < 1e-4
    assert np.abs(dropped_ref - kept_ref).max(-1).min() > 1e-3  # the two outcomes are told apart
    assert np.all(dropped ^ kept)
    assert abs(dropped.mean() - r) < 0.08  # 7 standard deviations (0.011), and the seed is fixed


@pytest.mark.slow
def test_remat_recomputes_blocks_with_the_same_random_draws():
    """Rematerialized blocks take their keys as arguments: training mode gives the same outputs, and
    the backward pass (``jax.checkpoint``) recomputes the same drop-path masks."""
    x = jnp.asarray(pixels())
    outs = []
    for remat in (False, True):
        model = deit.create(TINY, seed=8, drop_path=0.3, remat=remat)
        model.train()
        outs.append(np.asarray(forward(model, x, nnx.Rngs(dropout=3))))
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, rngs=nnx.Rngs(dropout=3)))(state))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == remat
    np.testing.assert_array_equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# (e) errors
# ---------------------------------------------------------------------------------------------


def test_timm_checkpoint_problems_are_reported_together():
    sd = deit.to_timm_state_dict(deit.create(TINY))
    del sd["blocks.1.norm1.weight"]
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    sd["blocks.0.attn.qkv.weight"] = np.zeros((90, 32), np.float32)
    with pytest.raises(deit.CheckpointMismatchError) as err:
        deit.from_timm_state_dict(sd, deit.resolve_config(TINY), source="bad.pth")
    message = str(err.value)
    for text in ("bad.pth", "1 missing", "blocks.1.norm1.weight", "1 unexpected", "blocks.0.attn.extra",
                 "1 wrong shape", "blocks.0.attn.qkv.weight: checkpoint (90, 32), model expects (96, 32)"):
        assert text in message, message
    sd = deit.to_timm_state_dict(deit.create(TINY))
    sd.update(dist_token=np.zeros((1, 1, 32), np.float32))
    with pytest.raises(deit.CheckpointMismatchError, match="distilled DeiT"):
        deit.from_timm_state_dict(sd, heads=4)


def test_hf_checkpoint_problems_are_reported_together():
    model = deit.create(TINY)
    hf = deit.to_hf_state_dict(model)
    del hf["vit.encoder.layer.0.attention.attention.key.weight"]
    hf["vit.encoder.layer.1.output.dense.bias"] = np.zeros(7, np.float32)
    hf["vit.pooler.dense.weight"] = np.zeros((32, 32), np.float32)  # ignored
    hf["vit.embeddings.mask_token"] = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(deit.CheckpointMismatchError) as err:
        deit.from_hf_state_dict(hf, deit_to_hf_config(model.config))
    message = str(err.value)
    for text in ("vit.encoder.layer.0.attention.attention.key.weight", "vit.embeddings.mask_token",
                 "vit.encoder.layer.1.output.dense.bias: checkpoint (7,), model expects (32,)"):
        assert text in message, message
    assert "pooler" not in message


def test_missing_files_and_unreachable_names_say_which(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        deit.load(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="not_a_model"):
        deit.load("not_a_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="facebook/deit-base-patch16-224"):
        deit.load("facebook/deit-base-patch16-224")
    empty = tmp_path / "hfdir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        deit.load(empty)
    # a download that does not match the sha256 prefix in facebookresearch's file name is refused
    bogus = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    bogus.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(pretrained, "download", lambda url, sha256="": bogus)
    with pytest.raises(FileNotFoundError, match="a1311bcf"):
        deit.load("deit_tiny")
    assert not bogus.exists()


# ---------------------------------------------------------------------------------------------
# (f) logical axes and sharding
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_logical_axes_cover_deit_b_and_shard_over_fsdp():
    from jax.sharding import PartitionSpec as P

    from jaxgist.training import parallel

    abstract = deit.abstract(deit.resolve_config("deit_b"))
    state = nnx.state(abstract)
    for path, var in nnx.to_flat_state(state):
        assert len(deit.logical_axes(path)) == len(var.shape), path
    with pytest.raises(KeyError, match="blocks.0.attn.rope"):
        deit.logical_axes(("blocks", 0, "attn", "rope", "kernel"))
    mesh = parallel.make_mesh((("data", 2), ("fsdp", 4)))
    shardings = parallel.tree_shardings(state, deit.logical_axes, (("embed", "fsdp"),), mesh)
    flat = {".".join(map(str, p)): s for p, s in nnx.to_flat_state(shardings)}
    spec = lambda name: flat[name].get_value().spec  # noqa: E731
    assert spec("blocks.3.attn.qkv.kernel") == P("fsdp")
    assert spec("blocks.3.attn.proj.kernel") == P(None, "fsdp")
    assert spec("blocks.3.mlp.fc2.kernel") == P(None, "fsdp")
    assert spec("patch_embed.proj.kernel") == P(None, None, None, "fsdp")
    assert spec("pos_embed") == P(None, None, "fsdp") and spec("cls_token") == P(None, None, "fsdp")
    assert spec("head.kernel") == P("fsdp") and spec("norm.scale") == P()
    sharded, total = parallel.sharded_count(shardings)
    assert (sharded, total) == (12 * 6 + 5, 12 * 12 + 8)  # not: LayerNorms, q/k/v and fc1 biases, head.bias

    # a sharded forward pass gives what one device does
    model = deit.create(TINY, seed=9)
    x = jnp.asarray(pixels(batch=8))
    want = np.asarray(forward(model, x))
    graphdef, params = nnx.split(model)
    with jax.set_mesh(mesh):
        tiny_shardings = parallel.tree_shardings(params, deit.logical_axes, (("embed", "fsdp"),), mesh)
        params = jax.device_put(params, tiny_shardings)
        assert params["blocks"][0]["attn"]["qkv"]["kernel"][...].sharding.spec == P("fsdp")
        out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, jax.device_put(x, parallel.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-5)
