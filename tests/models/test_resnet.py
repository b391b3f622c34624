"""torchvision's ResNet in NNX against HF's ``ResNetForImageClassification`` and a PyTorch ResNet with
torchvision's module names (random weights, randomized BatchNorm): logits in eval and train mode,
running statistics, conversion both ways, checkpoint errors, sharding, BatchNorm groups."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgist.models import resnet  # noqa: E402
from jaxgist.models.resnet import weights  # noqa: E402

ATOL = 1e-4
nn = torch.nn
# the smallest model with both block paths (a strided, projecting first block per stage after the first)
TINY = resnet.ResNetConfig(layers=(1, 1, 1, 1), num_classes=3, width=8, block="basic")


# ---------------------------------------------------------------------------------------------
# A PyTorch ResNet with torchvision's module names (torchvision itself does not import here)
# ---------------------------------------------------------------------------------------------


def _bn(c):
    return nn.BatchNorm2d(c)


class TorchBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: the stride is here
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    def __init__(self, block, layers, num_classes, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = _bn(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            planes, stride, blocks = width * 2**i, 1 if i == 0 else 2, []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or cin != planes * block.expansion:
                    down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, s, bias=False),
                                         _bn(planes * block.expansion))
                blocks.append(block(cin, planes, s, down))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def randomize_batchnorm(module, seed=0):
    """Random BatchNorm affine parameters and running statistics (fresh ones are 1/0/0/1 and hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def torch_reference(block="bottleneck", layers=(1, 2, 1, 1), num_classes=7, width=8, seed=0):
    torch.manual_seed(seed)
    cls = TorchBottleneck if block == "bottleneck" else TorchBasic
    return randomize_batchnorm(TorchResNet(cls, layers, num_classes, width), seed + 1).eval()


def pixels(batch=2, size=40, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def run_torch(ref, x):
    with torch.no_grad():
        return ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


_forward = nnx.jit(lambda model, x: model(x))


def forward(model, x):
    """``model(x)`` as numpy, jitted (one compile per model and mode rather than one per operation)."""
    return np.asarray(_forward(model, jnp.asarray(x)))


def stats(sd):
    return {k: np.asarray(v) for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------


def hf_reference(layer_type, v1=False, seed=0):
    width = 8
    expansion = 4 if layer_type == "bottleneck" else 1
    config = transformers.ResNetConfig(embedding_size=width, hidden_sizes=[width * 2**i * expansion for i in range(4)],
                                       depths=[1, 2, 1, 1], layer_type=layer_type, downsample_in_bottleneck=v1,
                                       num_labels=6)
    torch.manual_seed(seed)
    return randomize_batchnorm(transformers.ResNetForImageClassification(config), seed + 1).eval()


@pytest.mark.parametrize("layer_type,v1", [("bottleneck", False), ("basic", False), ("bottleneck", True)])
def test_matches_hf_resnet(layer_type, v1):
    ref = hf_reference(layer_type, v1)
    x = pixels(size=36)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()
    ours = resnet.from_hf_state_dict(ref.state_dict(), ref.config)
    assert ours.config.block == layer_type and ours.config.layers == (1, 2, 1, 1) and ours.config.num_classes == 6
    assert ours.config.downsample_in_bottleneck == v1
    np.testing.assert_allclose(forward(ours, x), want, rtol=0, atol=ATOL)


def test_hf_directory_and_backbone_only_checkpoints(tmp_path):
    ref = hf_reference("bottleneck", seed=3)
    ref.save_pretrained(tmp_path / "hf")
    x = pixels(size=32, seed=1)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()
        pooled = ref.resnet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.flatten(1).numpy()
    ours = resnet.load(tmp_path / "hf")
    np.testing.assert_allclose(forward(ours, x), want, rtol=0, atol=ATOL)
    # HF's ResNetModel (no "resnet." prefix, no classifier): a model without fc, returning its features
    backbone = resnet.from_hf_state_dict(ref.resnet.state_dict(), ref.config)
    assert backbone.fc is None and backbone.config.num_classes == 0
    np.testing.assert_allclose(forward(backbone, x), pooled, rtol=0, atol=ATOL)
    # not torchvision's architecture: refused with the reason
    odd = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    with pytest.raises(resnet.CheckpointMismatchError, match=r"hidden_sizes \[16, 32, 64, 128\].*\[32, 64, 128, 256\]"):
        resnet.config_from_hf(odd)


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
def test_matches_torchvision_layout_in_eval_and_train_mode(block):
    ref = torch_reference(block)
    sd = ref.state_dict()
    ours = resnet.from_torchvision_state_dict(sd)
    assert ours.config == resnet.ResNetConfig(layers=(1, 2, 1, 1), num_classes=7, width=8, block=block)
    x = pixels(batch=3, size=40)
    np.testing.assert_allclose(forward(ours, x), run_torch(ref, x), rtol=0, atol=ATOL)
    assert ours.feature_dim == 8 * 8 * (4 if block == "bottleneck" else 1)
    # train mode: batch statistics, and PyTorch's running update (unbiased variance), in every BatchNorm
    ref.train()
    ours.train()
    np.testing.assert_allclose(forward(ours, x), run_torch(ref, x), rtol=0, atol=ATOL)
    want, got = stats(ref.state_dict()), stats(resnet.to_torchvision_state_dict(ours))
    assert want.keys() == got.keys() and len(want) > 10
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=ATOL, err_msg=key)
    ours.eval()
    assert all(m.use_running_average for _, m in nnx.iter_modules(ours) if hasattr(m, "groups"))


@pytest.mark.slow
def test_full_size_resnet50_matches():
    ref = torch_reference("bottleneck", layers=(3, 4, 6, 3), num_classes=1000, width=64)
    ours = resnet.from_torchvision_state_dict(ref.state_dict())
    assert ours.config == resnet.PRESETS["resnet50"]
    x = pixels(batch=2, size=224)
    want = run_torch(ref, x)
    got = forward(ours, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL * max(1.0, np.abs(want).max()))


# ---------------------------------------------------------------------------------------------
# Conversion, files, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_and_torch_accepts_the_state_dict():
    model = resnet.create(TINY, seed=1)
    sd = resnet.to_torchvision_state_dict(model)
    again = resnet.to_torchvision_state_dict(resnet.from_torchvision_state_dict(sd))
    assert sd.keys() == again.keys()
    for key in sd:
        np.testing.assert_array_equal(sd[key], again[key], err_msg=key)
    ref = TorchResNet(TorchBasic, TINY.layers, TINY.num_classes, TINY.width)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)  # counters filled in
    x = pixels(size=32)
    np.testing.assert_allclose(forward(model, x), run_torch(ref.eval(), x), rtol=0, atol=ATOL)


def test_a_bad_state_dict_lists_every_problem_at_once():
    sd = {k: v.numpy() for k, v in torch_reference().state_dict().items()}
    del sd["layer2.1.bn2.running_var"]
    sd["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    sd["layer3.0.conv2.weight"] = sd["layer3.0.conv2.weight"][:, :5]
    with pytest.raises(resnet.CheckpointMismatchError) as e:
        resnet.from_torchvision_state_dict(sd, resnet.ResNetConfig(layers=(1, 2, 1, 1), num_classes=7, width=8))
    message = str(e.value)
    assert "1 missing key(s):\n    layer2.1.bn2.running_var" in message
    assert "1 unexpected key(s):\n    layer9.0.conv1.weight" in message
    assert "layer3.0.conv2.weight: checkpoint (32, 5, 3, 3), model expects (32, 32, 3, 3)" in message
    with pytest.raises(resnet.CheckpointMismatchError, match="HF's ResNetForImageClassification keys"):
        resnet.from_torchvision_state_dict(hf_reference("basic").state_dict())


def test_load_files_names_and_heads(tmp_path, monkeypatch):
    ref = torch_reference("basic", seed=4)
    sd = ref.state_dict()
    x = jnp.asarray(pixels(size=32, seed=2))
    want = run_torch(ref, np.asarray(x))
    # a training checkpoint: the state dict under "model", DataParallel's "module." prefix
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = resnet.load(tmp_path / "ckpt.pth")
    np.testing.assert_allclose(forward(loaded, x), want, rtol=0, atol=ATOL)
    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    bf16 = resnet.load(tmp_path / "w.safetensors", dtype=jnp.bfloat16)
    assert bf16.conv1.kernel[...].dtype == jnp.bfloat16 and bf16.bn1.mean[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(bf16.fc.bias[...], np.float32),
                                  sd["fc.bias"].numpy().astype(jnp.bfloat16).astype(np.float32))
    # another number of classes: refused unless the head is reset (the backbone kept)
    with pytest.raises(resnet.CheckpointMismatchError, match="7-class head, not 3; pass reset_head=True"):
        resnet.load(tmp_path / "ckpt.pth", num_classes=3)
    fresh = resnet.load(tmp_path / "ckpt.pth", num_classes=3, reset_head=True)
    assert fresh.config.num_classes == 3 and fresh.fc.kernel.shape == (loaded.feature_dim, 3)
    assert set(resnet.to_torchvision_state_dict(fresh)) == set(resnet.to_torchvision_state_dict(loaded))
    for key, value in resnet.to_torchvision_state_dict(loaded).items():
        if not key.startswith("fc."):
            np.testing.assert_array_equal(resnet.to_torchvision_state_dict(fresh)[key], value, err_msg=key)
    # a torchvision name: downloaded into the cache, its sha256 checked against the prefix in the file name
    monkeypatch.setenv("JAXGIST_CACHE", str(tmp_path / "cache"))
    torch.save(sd, tmp_path / "plain.pth")
    prefix = hashlib.sha256((tmp_path / "plain.pth").read_bytes()).hexdigest()[:8]
    (tmp_path / f"tiny-{prefix}.pth").write_bytes((tmp_path / "plain.pth").read_bytes())
    (tmp_path / "bad-00000000.pth").write_bytes((tmp_path / "plain.pth").read_bytes())
    monkeypatch.setitem(weights.TORCHVISION_WEIGHTS, "tiny", (tmp_path / f"tiny-{prefix}.pth").as_uri())
    monkeypatch.setitem(weights.TORCHVISION_WEIGHTS, "bad", (tmp_path / "bad-00000000.pth").as_uri())
    np.testing.assert_allclose(forward(resnet.load("tiny"), x), want, rtol=0, atol=ATOL)
    with pytest.raises(FileNotFoundError, match="does not start with 00000000"):
        resnet.load("bad")
    assert not (tmp_path / "cache" / "checkpoints" / "bad-00000000.pth").exists()


def test_missing_files_and_unreachable_names_say_so(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        resnet.load(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resnet.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="microsoft/resnet-50"):
        resnet.load("microsoft/resnet-50")  # the tests run with HF_HUB_OFFLINE=1
    monkeypatch.setenv("JAXGIST_CACHE", str(tmp_path))
    monkeypatch.setitem(weights.TORCHVISION_WEIGHTS, "resnet50", "http://127.0.0.1:9/models/resnet50-11ad3fa6.pth")
    with pytest.raises(FileNotFoundError, match=r"downloading http://127\.0\.0\.1:9/models/resnet50-11ad3fa6\.pth"):
        resnet.load("resnet50")
    assert weights.TORCHVISION_WEIGHTS["resnet101"].endswith("resnet101-cd907fc2.pth")


# ---------------------------------------------------------------------------------------------
# Model: init, sharding, BatchNorm groups, numerics options
# ---------------------------------------------------------------------------------------------


def test_presets_and_torchvision_init():
    assert resnet.PRESETS["resnet152"].layers == (3, 8, 36, 3) and resnet.PRESETS["resnet34"].block == "basic"
    params = nnx.state(resnet.abstract("resnet50"), nnx.Param)
    assert sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(params)) == 25_557_032  # torchvision's count
    model = resnet.create("resnet50", layers=(1, 1, 1, 1), width=8, num_classes=10, zero_init_residual=True)
    k = np.asarray(model.layer3[0].conv2.kernel[...])  # (3, 3, 32, 32): std sqrt(2 / fan_out)
    assert abs(k.std() - np.sqrt(2 / (9 * 32))) < 0.05 * np.sqrt(2 / (9 * 32)) and abs(k.mean()) < 0.01
    fc = np.asarray(model.fc.kernel[...])
    bound = 1 / np.sqrt(model.feature_dim)
    assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.9 * bound and np.abs(model.fc.bias[...]).max() <= bound
    assert float(model.layer1[0].bn3.scale[...].max()) == 0.0 and float(model.layer1[0].bn2.scale[...].min()) == 1.0
    with pytest.raises(ValueError, match="block='wide'"):
        resnet.create("resnet50", block="wide")


@pytest.mark.slow
def test_logical_axes_cover_resnet50_and_shard_over_eight_devices():
    from jaxgist.training import parallel

    state = nnx.state(resnet.abstract("resnet50"), nnx.Any(nnx.Param, nnx.BatchStat))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        assert len(resnet.logical_axes(path)) == len(var.shape), path
    assert len(flat) == 53 + 4 * 53 + 2  # 53 convolutions, 53 BatchNorms of 4 arrays, fc's kernel and bias
    with pytest.raises(KeyError, match="layer1.0.attn.kernel"):
        resnet.logical_axes(("layer1", 0, "attn", "kernel"))
    mesh = parallel.make_mesh((("data", 2), ("fsdp", 4)))
    rules = (("embed", "fsdp"),)
    shardings = parallel.tree_shardings(state, resnet.logical_axes, rules, mesh)
    assert shardings["layer4"][0]["conv2"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert shardings["fc"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp")
    # a small model placed by those rules gives the unsharded answer, the batch split over data x fsdp
    model = resnet.create(TINY, seed=2)
    x = pixels(batch=8, size=32)
    want = forward(model, x)
    graphdef, small = nnx.split(model)
    placed = jax.device_put(small, parallel.tree_shardings(small, resnet.logical_axes, rules, mesh))
    assert placed["layer2"][0]["conv1"]["kernel"][...].sharding.spec[-1] == "fsdp"

    @jax.jit
    def sharded_forward(state, x):
        return nnx.merge(graphdef, state)(x)

    got = sharded_forward(placed, jax.device_put(x, parallel.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_batchnorm_groups_normalize_each_run_of_rows_alone():
    model = resnet.create(TINY, seed=5)
    halves = [nnx.clone(model), nnx.clone(model)]
    resnet.set_batchnorm_groups(model, 2)
    assert {m.groups for _, m in nnx.iter_modules(model) if hasattr(m, "groups")} == {2}
    x = jnp.asarray(pixels(batch=4, size=32, seed=3))
    model.train()
    got = forward(model, x)
    parts = []
    for half, rows in zip(halves, (x[:2], x[2:])):
        half.train()
        parts.append(forward(half, rows))
    np.testing.assert_allclose(got, np.concatenate(parts), rtol=0, atol=1e-5)
    # the running statistics move by the mean of the groups'
    a, b = (resnet.to_torchvision_state_dict(h) for h in halves)
    np.testing.assert_allclose(resnet.to_torchvision_state_dict(model)["layer2.0.bn1.running_var"],
                               (a["layer2.0.bn1.running_var"] + b["layer2.0.bn1.running_var"]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="groups=0"):
        resnet.set_batchnorm_groups(model, 0)


def test_bf16_compute():
    model = resnet.create(TINY, seed=6)
    x = jnp.asarray(pixels(size=32, seed=4))
    want = forward(model, x)
    bf16 = resnet.create(TINY, seed=6, dtype=jnp.bfloat16)
    got = _forward(bf16, x)
    assert got.dtype == jnp.float32 and bf16.conv1.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=0.05 * np.abs(want).max())


@pytest.mark.slow
def test_remat_gives_the_same_gradients_and_statistics():
    model = resnet.create(TINY, seed=6)
    x = jnp.asarray(pixels(size=32, seed=4))

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    model.train()
    remat = resnet.create(TINY, seed=6, remat=True)
    remat.train()
    grad = nnx.jit(nnx.grad(loss))
    g1, g2 = grad(model, x), grad(remat, x)
    np.testing.assert_allclose(np.asarray(g2["layer1"][0]["conv1"]["kernel"][...]),
                               np.asarray(g1["layer1"][0]["conv1"]["kernel"][...]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(remat.bn1.var[...]), np.asarray(model.bn1.var[...]), atol=1e-6)
