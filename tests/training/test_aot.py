"""Ahead-of-time compilation of the real train step for TPU topologies (jaxgist.aot).

Needs libtpu (``pip install -e ".[tpu]"``; the README's test command installs it): without it the
compile tests skip with the reason. Nothing runs on a TPU: libtpu compiles for abstract chips.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import finetune as finetune_config
from jaxgist import aot
from jaxgist.core.config import ConfigError
from jaxgist.training import aot as training_aot

ROOT = pathlib.Path(__file__).resolve().parents[2]

try:
    import libtpu  # noqa: F401

    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False

needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason='libtpu is not installed (pip install -e ".[tpu]")')

# Big enough that parameters and Adam moments dominate a small batch's activations: a 49,408 x 512
# token embedding plus two 512-wide blocks per tower (~40M parameters, ~0.45 GiB with Adam).
MEDIUM = dict(
    vision=dict(image_size=64, patch_size=16, width=512, layers=2, heads=8, mlp_dim=2048),
    text=dict(context_length=77, width=512, layers=2, heads=8, mlp_dim=2048),
    embed_dim=256,
)
DP = (("data", -1), ("fsdp", 1))
FSDP = (("data", 1), ("fsdp", -1))


def small_config(**train):
    c = finetune_config.get_config("small")
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def v5e_2x2():
    if not HAVE_LIBTPU:
        pytest.skip('libtpu is not installed (pip install -e ".[tpu]")')
    return aot.topology_devices("v5e:2x2")


def test_parse_topology():
    assert aot.parse_topology("v5e:16x16") == ("v5e", (16, 16))
    assert aot.parse_topology("v4:4x4x4") == ("v4", (4, 4, 4))
    for bad in ("v5e", "v5e:16", "16x16", "v5e:4x4x", "tpu:2x2", ""):
        with pytest.raises(aot.TopologyError, match="not of the form"):
            aot.parse_topology(bad)


@needs_libtpu
def test_topologies_have_the_chips_their_names_say():
    assert len(aot.topology_devices("v5e:16x16")) == 256
    v4 = aot.topology_devices("v4:4x4x4")
    assert len(v4) == 64 and v4[0].device_kind == "TPU v4"  # megacore: one device per chip
    assert len({d.process_index for d in v4}) == 16  # 4 chips per host
    with pytest.raises(aot.TopologyError, match="does not know topology"):
        aot.topology_devices("v99:2x2")


@needs_libtpu
def test_tiny_training_config_compiles_for_v5e_2x2(v5e_2x2):
    c = small_config()
    r = aot.compile_train_step(c, v5e_2x2, topology="v5e:2x2")
    assert r.fits and r.num_devices == 4 and r.device_kind == "TPU v5 lite"
    assert r.mesh == {"data": 4, "fsdp": 1} and r.per_device_batch == c.train.global_batch // 4
    assert r.hbm_bytes == aot.USABLE_HBM["TPU v5 lite"]
    # the state is donated: its outputs are written over its arguments
    assert r.alias_bytes > 0 and r.output_bytes >= r.alias_bytes
    assert r.total_bytes == (r.compiled_argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
                             + r.code_bytes)
    # the compiler's argument size is what the shardings say each chip holds (plus padding)
    from jaxgist.methods import finetune_step
    from jaxgist.training import parallel

    setup = finetune_step.build(c, parallel.make_mesh(c.mesh, v5e_2x2), 10)
    held = aot.bytes_per_device((setup.abstract_state, setup.abstract_batch(c.train.global_batch)))
    assert r.argument_bytes == held
    assert held <= r.compiled_argument_bytes < 1.1 * held
    assert r.flops_per_device > 0 and r.flops_total == pytest.approx(4 * r.flops_per_device)
    # 3 x (forward matmul FLOPs) is a floor for a training step
    assert r.flops_per_device > 3 * 2 * (c.train.global_batch // 4) * r.num_params * 0.01
    text = r.summary()
    assert "fits" in text and "TPU v5 lite" in text and "per chip" in text


@needs_libtpu
@pytest.mark.slow
def test_fsdp_needs_less_memory_per_chip_than_replication(v5e_2x2):
    reports = {}
    for name, mesh in (("dp", DP), ("fsdp", FSDP)):
        c = small_config(global_batch=8)
        c.model.preset = MEDIUM
        c.mesh = mesh
        reports[name] = aot.compile_train_step(c, v5e_2x2, topology="v5e:2x2")
    dp, fsdp = reports["dp"], reports["fsdp"]
    assert dp.mesh == {"data": 4, "fsdp": 1} and fsdp.mesh == {"data": 1, "fsdp": 4}
    assert dp.num_params == fsdp.num_params > 35_000_000
    # parameters and both Adam moments are sharded four ways
    assert fsdp.argument_bytes < 0.35 * dp.argument_bytes
    assert fsdp.total_bytes < 0.6 * dp.total_bytes, (dp.summary(), fsdp.summary())
    # the same model work either way; data parallelism repeats the Adam update on every chip, FSDP
    # updates each shard once (a visible share of this small-batch step)
    assert 0.8 * dp.flops_total <= fsdp.flops_total <= 1.01 * dp.flops_total


def test_batch_that_does_not_divide_over_the_data_axes_fails_before_compiling(monkeypatch):
    import jax

    from jaxgist.methods import finetune_step

    monkeypatch.setattr(finetune_step, "build", lambda *a, **k: pytest.fail("built the step for a bad batch"))
    devices = jax.devices()[:8]  # any 8 devices: the check comes before anything is compiled
    c = small_config(global_batch=12)
    c.mesh = (("data", 2), ("fsdp", 4))
    with pytest.raises(ConfigError, match=r"global_batch=12 is not divisible by the 8 data-parallel devices"):
        aot.compile_train_step(c, devices, topology="cpu:8")
    c.mesh = (("data", 3), ("fsdp", 1))
    with pytest.raises(ConfigError, match="mesh"):
        aot.compile_train_step(c, devices, topology="cpu:8")


@needs_libtpu
def test_too_small_hbm_is_reported_as_not_fitting(v5e_2x2):
    r = aot.compile_train_step(small_config(), v5e_2x2, topology="v5e:2x2", hbm_bytes=1024)
    assert not r.fits and r.total_bytes > 1024 and "DOES NOT FIT" in r.summary()


def test_compiler_out_of_memory_message_is_parsed():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(18.49G) exceeds available HBM (15.75G).")
    required, available, is_total = training_aot._oom_sizes(msg)
    assert required == pytest.approx(18.49 * 2**30) and available == pytest.approx(15.75 * 2**30)
    assert not is_total  # temporaries alone
    msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in "
           "memory space hbm. Used 16.25G of 15.75G hbm. Exceeded hbm capacity by 515.03M.")
    required, available, is_total = training_aot._oom_sizes(msg)
    assert required == pytest.approx(16.25 * 2**30) and available == pytest.approx(15.75 * 2**30) and is_total
    assert training_aot._oom_sizes("RESOURCE_EXHAUSTED: something else") == (None, None, False)


def _cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "jaxgist.aot", "--config", str(ROOT / "configs/finetune.py:small"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@needs_libtpu
@pytest.mark.slow
def test_cli_reports_and_exits_by_fit(tmp_path):
    out = tmp_path / "report.json"
    ok = _cli("--topology", "v5e:2x2", "--json", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "per-chip memory" in ok.stdout and "FLOPs per step" in ok.stdout and "compile" in ok.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["topology"] == "v5e:2x2" and report["num_devices"] == 4

    over = _cli("--topology", "v5e:2x2", "--hbm_gib", "0.001")
    assert over.returncode == 1
    assert "does not fit on v5e:2x2" in over.stderr

    bad = _cli("--topology", "v5e:2x2", "--config.train.global_batch=6")
    assert bad.returncode == 2
    assert "global_batch=6 is not divisible by the 4 data-parallel devices" in bad.stderr
    assert "compile" not in bad.stdout


def test_cli_without_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(aot.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
        aot.topology_devices("v5e:2x2")


@needs_libtpu
@pytest.mark.parametrize("config_file", ["demo", "flip", "gpt4image", "cgtgan"])
def test_other_methods_compile_their_train_step(v5e_2x2, config_file):
    """GIST (its fine-tuning stage), FLIP, GPT4Image (classifier, projection and EMA) and CgT-GAN (its
    adversarial step: generator, discriminator and the frozen CLIP) compile through
    the same command; a method without a train step is refused before anything is compiled."""
    from configs import cgtgan, demo, flip, gpt4image

    c = {"demo": lambda: demo.get_config("runlocal"), "flip": lambda: flip.get_config("small"),
         "gpt4image": lambda: gpt4image.get_config("model=deit_b,runlocal"),
         "cgtgan": lambda: cgtgan.get_config("runlocal")}[config_file]()
    c.train.global_batch = 8
    r = aot.compile_train_step(c, v5e_2x2, topology="v5e:2x2")
    assert r.fits and r.num_params > 0 and r.per_device_batch == 2 and r.temp_bytes is not None
    c.method = "zero_shot"
    with pytest.raises(ConfigError, match="'zero_shot' has no train step to compile"):
        aot.compile_train_step(c, v5e_2x2, topology="v5e:2x2")


@needs_libtpu
@pytest.mark.slow
def test_rn50_finetuning_compiles_for_v5e_2x2_with_sharded_convolutions_and_batchnorm(v5e_2x2):
    """OpenAI's RN50 at full size, fine-tuned with FSDP (about 2 minutes of compiling): convolution
    kernels and BatchNorm are covered by the sharding rules, so each of the 4 chips holds about a
    quarter of the parameters and Adam moments."""
    c = small_config(global_batch=8)
    c.model.init = "RN50"  # the architecture only: compiling reads no weights
    c.mesh = FSDP
    r = aot.compile_train_step(c, v5e_2x2, topology="v5e:2x2")
    assert r.fits and r.mesh == {"data": 1, "fsdp": 4} and r.num_params > 100e6
    replicated = 3 * 4 * r.num_params  # fp32 parameters and two Adam moments on every chip
    assert r.argument_bytes < 0.4 * replicated, (r.argument_bytes, replicated)
