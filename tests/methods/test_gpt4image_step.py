"""GPT4Image's train step against PyTorch steps written here (GPT4Image's loss, SGD, BatchNorm), on one
device and as the reference's 2-GPU DDP run (per-device BatchNorm, gathered features without gradient),
and the same step on 1 device, 8 devices and a 4x2 data/fsdp mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from jaxgist.methods import gpt4image, gpt4image_step  # noqa: E402
from jaxgist.models import projection, resnet  # noqa: E402
from jaxgist.training import parallel  # noqa: E402
from tests.models.test_resnet import torch_reference  # noqa: E402

F = torch.nn.functional
TEXT_DIM, BATCH, SIZE, CLASSES, LR = 16, 8, 32, 7, 0.01


def config(**g):
    c = gpt4image.default_config()
    c.optim.update(dict(name="sgd", lr=LR, momentum=0.9, weight_decay=1e-4, schedule="constant",
                        schedule_unit="step"))
    c.gpt4image.update(dict(lamb=0.3, tau=0.2, **g))
    return c


def batches(n=2, seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        e = rng.normal(size=(BATCH, TEXT_DIM)).astype(np.float32)
        out.append({"image": rng.normal(size=(BATCH, size, size, 3)).astype(np.float32),
                    "label": rng.integers(0, CLASSES, BATCH).astype(np.int32),
                    "text_embedding": e / np.linalg.norm(e, axis=1, keepdims=True)})
    return out


def torch_projection(proj: projection.ProjectionMLP):
    m = torch.nn.Sequential(torch.nn.Linear(proj.fc1.kernel.shape[0], proj.fc1.kernel.shape[1], bias=False),
                            torch.nn.BatchNorm1d(proj.fc1.kernel.shape[1]), torch.nn.ReLU(),
                            torch.nn.Linear(proj.fc2.kernel.shape[0], proj.fc2.kernel.shape[1]))
    sd = {}
    for ours, theirs in projection.torch_names(batchnorm=True).items():
        module, leaf = ours.split(".")
        value = np.asarray(getattr(getattr(proj, module), leaf)[...])
        sd[theirs.replace("proj_layer.", "")] = torch.from_numpy(np.array(value.T if leaf == "kernel" else value))  # a copy
    m.load_state_dict(sd, strict=False)
    return m


def torch_features(ref, x):
    x = ref.maxpool(torch.relu(ref.bn1(ref.conv1(x))))
    for i in range(1, 5):
        x = getattr(ref, f"layer{i}")(x)
    return x.mean(dim=(2, 3))


def clip_loss(img, txt, tau):
    img = F.normalize(img, dim=-1)
    logits = img @ txt.T / tau
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def models(seed=0):
    ref = torch_reference(layers=(1, 1, 1, 1), num_classes=CLASSES, width=8, seed=seed)
    ours = resnet.from_torchvision_state_dict({k: v.numpy().copy() for k, v in ref.state_dict().items()})
    proj = projection.ProjectionMLP.for_resnet(ours.feature_dim, TEXT_DIM, rngs=nnx.Rngs(seed + 5))
    return ref, ours, proj


def jax_steps(c, mesh, ours, proj, data):
    bb = gpt4image.backbone("resnet50")
    setup = gpt4image_step.build(c, mesh, 10, abstract_classifier=nnx.eval_shape(lambda: ours),
                                 abstract_projection=nnx.eval_shape(lambda: proj), backbone=bb)
    with jax.set_mesh(mesh):
        state = setup.init_state(ours, proj)
    for b in data:
        state, metrics = setup.step(state, {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in b.items()})
    return setup, state, metrics


def flat_torch(ref, proj):
    out = {f"model.{k}": v.detach().numpy() for k, v in ref.state_dict().items() if "num_batches" not in k}
    out.update({f"proj.{k}": v.detach().numpy() for k, v in proj.state_dict().items() if "num_batches" not in k})
    return out


def flat_ours(setup, state):
    model = setup.model(state, gpt4image_step.CLASSIFIER)
    proj = setup.model(state, gpt4image_step.PROJECTION)
    out = {f"model.{k}": np.asarray(v) for k, v in resnet.to_torchvision_state_dict(model).items()
           if "num_batches" not in k}
    for ours, theirs in projection.torch_names(batchnorm=True).items():
        module, leaf = ours.split(".")
        value = np.asarray(getattr(getattr(proj, module), leaf)[...])
        out[theirs.replace("proj_layer", "proj")] = value.T if leaf == "kernel" else value
    return out


def assert_close(ours, theirs, tol=1e-5):
    """Every array within ``tol`` absolute plus ``tol`` relative (running variances reach tens)."""
    assert sorted(ours) == sorted(theirs)
    worst = max((float(np.max(np.abs(ours[k] - theirs[k]) / (1.0 + np.abs(theirs[k])))), k) for k in ours)
    assert worst[0] < tol, worst


@pytest.mark.slow
def test_one_device_steps_match_pytorch():
    ref, ours, proj = models()
    data = batches()
    tproj = torch_projection(proj)
    ref.train(), tproj.train()
    opt = torch.optim.SGD(list(ref.parameters()) + list(tproj.parameters()), lr=LR, momentum=0.9, weight_decay=1e-4)
    for b in data:
        x = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy())
        feat = torch_features(ref, x)
        ce = F.cross_entropy(ref.fc(feat), torch.from_numpy(b["label"]).long())
        tl = clip_loss(tproj(feat), torch.from_numpy(b["text_embedding"]), 0.2)
        opt.zero_grad()
        (ce + 0.3 * tl).backward()
        opt.step()
    mesh = parallel.make_mesh((("data", 1),), devices=jax.devices()[:1])
    setup, state, metrics = jax_steps(config(bn_sync=True), mesh, ours, proj, data)
    assert abs(float(metrics["ce_loss"]) - float(ce)) < 1e-5 and abs(float(metrics["text_loss"]) - float(tl)) < 1e-5
    assert_close(flat_ours(setup, state), flat_torch(ref, tproj))


@pytest.mark.slow
def test_reference_scale_and_per_device_batchnorm_match_a_two_gpu_ddp_run():
    """The reference on 2 GPUs: each rank normalizes its half with its own BatchNorm statistics, its
    text loss sees the other rank's features without gradient, DDP averages the gradients. Ours, on
    one device: bn_groups=2, text_loss_scale="reference:2". Running statistics: the mean of the ranks'."""
    ref, ours, proj = models(seed=3)
    data = batches(seed=1)
    tproj = torch_projection(proj)
    replicas = [(ref, tproj)]
    import copy

    replicas.append((copy.deepcopy(ref), copy.deepcopy(tproj)))
    for r, p in replicas:
        r.train(), p.train()
    params = [list(r.parameters()) + list(p.parameters()) for r, p in replicas]
    opts = [torch.optim.SGD(ps, lr=LR, momentum=0.9, weight_decay=1e-4) for ps in params]
    half = BATCH // 2
    for b in data:
        x = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(b["label"]).long()
        e = torch.from_numpy(b["text_embedding"])
        feats, zs = [], []
        for i, (r, p) in enumerate(replicas):
            f = torch_features(r, x[i * half:(i + 1) * half])
            feats.append(f)
            zs.append(p(f))
        grads = []
        for i, (r, p) in enumerate(replicas):
            everyone = [z if j == i else z.detach() for j, z in enumerate(zs)]
            ce = F.cross_entropy(r.fc(feats[i]), y[i * half:(i + 1) * half])
            loss = ce + 0.3 * clip_loss(torch.cat(everyone), e, 0.2)
            opts[i].zero_grad()
            loss.backward(retain_graph=True)
            grads.append([q.grad.clone() for q in params[i]])
        for i in range(2):  # DDP: every rank steps with the mean gradient
            for q, g0, g1 in zip(params[i], grads[0], grads[1]):
                q.grad = (g0 + g1) / 2
            opts[i].step()
    theirs = flat_torch(*replicas[0])
    other = flat_torch(*replicas[1])
    for k in theirs:
        if k.endswith(("running_mean", "running_var")):
            theirs[k] = (theirs[k] + other[k]) / 2
        else:
            np.testing.assert_array_equal(theirs[k], other[k])  # the replicas stay identical
    mesh = parallel.make_mesh((("data", 1),), devices=jax.devices()[:1])
    setup, state, _ = jax_steps(config(bn_groups=2, text_loss_scale="reference:2"), mesh, ours, proj, data)
    # 2e-5: conv1's gradient sums two half-batches' 8x16x16 positions in float32, in another order
    assert_close(flat_ours(setup, state), theirs, tol=2e-5)
    # and the clean form differs from it: twice the text loss's weight
    setup, state, _ = jax_steps(config(bn_groups=2), mesh, *models(seed=3)[1:], data)
    with pytest.raises(AssertionError):
        assert_close(flat_ours(setup, state), theirs, tol=2e-5)


@pytest.mark.slow
def test_one_eight_and_four_by_two_devices_give_the_same_state():
    data = batches(seed=2, size=64)  # BatchNorm statistics over 4 images x 2x2 positions at the last stage
    c = config(bn_groups=2, ema_decay=0.5)
    results = []
    for spec, devices in (((("data", 1),), jax.devices()[:1]), ((("data", 8),), None),
                          ((("data", 4), ("fsdp", 2)), None)):
        mesh = parallel.make_mesh(spec, devices=devices)
        _, ours, proj = models(seed=4)
        setup, state, _ = jax_steps(c, mesh, ours, proj, data)
        results.append({f"{name}." + ".".join(map(str, k)): np.asarray(v) for name in state.models
                        for k, v in nnx.to_flat_state(state.models[name])})
    for other in results[1:]:
        # reduction order differs across devices: conv1's gradient sums 8 x 32 x 32 positions (measured 6e-5)
        assert_close({k: np.asarray(v, np.float32) for k, v in other.items()},
                     {k: np.asarray(v, np.float32) for k, v in results[0].items()}, tol=1e-4)
    ema = [k for k in results[0] if k.startswith("ema.") and k.endswith("mean")]
    assert ema and any(np.abs(results[0][k]).max() > 0 for k in ema)  # the EMA moved its statistics too


def test_text_weight_and_loss():
    assert gpt4image_step.text_weight("global", 0.3) == 0.3
    assert gpt4image_step.text_weight("reference:4", 0.3) == pytest.approx(0.075)
    for bad in ("reference:0", "reference:x", "local"):
        with pytest.raises(ValueError, match="text_loss_scale"):
            gpt4image_step.text_weight(bad, 0.3)
    z = jnp.eye(4)
    # aligned pairs score below shuffled ones
    assert float(gpt4image_step.text_loss(z, z, 0.2)) < float(gpt4image_step.text_loss(z, z[::-1], 0.2))


@pytest.mark.slow
def test_deit_adamw_step_with_label_smoothing_matches_pytorch():
    """DeiT's recipe: AdamW with no weight decay on biases, norms, class token and position embedding,
    label smoothing 0.1, tau 0.05, the projection Linear-ReLU-Linear (drop-path off: its draws differ)."""
    from jaxgist.models import deit
    from tests.models.test_deit import torch_vit

    ref = torch_vit(seed=1, classes=CLASSES).train()
    ours = deit.from_timm_state_dict({k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}, heads=4)
    proj = projection.ProjectionMLP.for_deit(ours.feature_dim, TEXT_DIM, rngs=nnx.Rngs(2))
    tproj = torch.nn.Sequential(torch.nn.Linear(ours.feature_dim, 2 * TEXT_DIM), torch.nn.ReLU(),
                                torch.nn.Linear(2 * TEXT_DIM, TEXT_DIM))
    names = projection.torch_names(batchnorm=False)
    sd = {}
    for path, key in names.items():
        module, leaf = path.split(".")
        value = np.array(getattr(getattr(proj, module), leaf)[...])
        sd[key.replace("proj_layer.", "")] = torch.from_numpy(value.T.copy() if leaf == "kernel" else value)
    tproj.load_state_dict(sd)
    decay, no_decay = [], []
    for name, p in list(ref.named_parameters()) + [(f"proj.{n}", p) for n, p in tproj.named_parameters()]:
        (no_decay if p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    data = batches(seed=5)
    for b in data:
        x = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy())
        h = ref.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([ref.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + ref.pos_embed
        for block in ref.blocks:
            h = block(h)
        feat = ref.norm(h)[:, 0]
        ce = F.cross_entropy(ref.head(feat), torch.from_numpy(b["label"]).long(), label_smoothing=0.1)
        tl = clip_loss(tproj(feat), torch.from_numpy(b["text_embedding"]), 0.05)
        opt.zero_grad()
        (ce + 0.3 * tl).backward()
        opt.step()
    c = gpt4image.default_config()
    c.optim.update(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, schedule="constant",
                        decay_exclude=r"(bias|scale|cls_token|pos_embed)$", schedule_unit="step"))
    c.gpt4image.update(dict(lamb=0.3, tau=0.05, label_smoothing=0.1))
    mesh = parallel.make_mesh((("data", 1),), devices=jax.devices()[:1])
    setup = gpt4image_step.build(c, mesh, 10, abstract_classifier=nnx.eval_shape(lambda: ours),
                                 abstract_projection=nnx.eval_shape(lambda: proj), backbone=gpt4image.backbone("deit_b"))
    with jax.set_mesh(mesh):
        state = setup.init_state(ours, proj)
    for b in data:
        state, metrics = setup.step(state, {k: jax.device_put(v) for k, v in b.items()})
    assert abs(float(metrics["ce_loss"]) - float(ce)) < 1e-5
    got = {f"model.{k}": v for k, v in deit.to_timm_state_dict(setup.model(state)).items()}
    p = setup.model(state, gpt4image_step.PROJECTION)
    for path, key in names.items():
        module, leaf = path.split(".")
        value = np.asarray(getattr(getattr(p, module), leaf)[...])
        got[key.replace("proj_layer", "proj")] = value.T if leaf == "kernel" else value
    theirs = flat_torch(ref, tproj)
    # The key bias (the middle third of qkv.bias) has an exactly zero gradient (softmax ignores a shift
    # shared by every key); Adam turns each framework's float noise there into steps of up to lr. The
    # q and v thirds are compared; the k third only moves within 2 steps of lr.
    for k in [k for k in got if k.endswith("attn.qkv.bias")]:
        d = got[k].shape[0] // 3
        assert np.abs(got[k][d:2 * d] - theirs[k][d:2 * d]).max() <= 2 * 2e-3
        got[k], theirs[k] = np.delete(got[k], np.s_[d:2 * d]), np.delete(theirs[k], np.s_[d:2 * d])
    assert_close(got, theirs)


@pytest.mark.slow
def test_mixup_and_cutmix_mix_images_and_targets_alike():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(6, 16, 16, 3)).astype(np.float32))
    labels = jnp.asarray([0, 1, 2, 3, 4, 0])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        fn = gpt4image_step.mixup_cutmix(mixup, cutmix, 0.5, 0.1, 5)
        for seed in range(4):
            mixed, targets = fn(labels, images, jax.random.key(seed))
            targets = np.asarray(targets)
            np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
            # lambda read back from the targets of image 1 (label 1, partner image 4 with label 4)
            lam = (targets[1, 1] - 0.1 / 5) / 0.9
            if mixup:
                np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)
            else:  # the pasted box covers exactly 1 - lambda of every image
                pasted = np.mean(np.all(np.asarray(mixed)[1] == np.asarray(images)[4], axis=-1))
                assert pasted == pytest.approx(1 - lam, abs=1e-6)
    assert gpt4image_step.mixup_cutmix(0.0, 0.0, 0.5, 0.1, 5) is None
