"""Test setup: 8 fake CPU devices and jaxgist's default XLA flags (set before jax is imported), and parsed
absl flags."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxgist.core import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # the flags jaxgist's launcher runs with
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def timm_module():
    """Loads one of timm's files by its path inside the installed package (``pip install --no-deps
    timm==0.3.2``, the version DeiT pins), without importing ``timm`` itself (which needs torchvision):
    ``timm_module("data/auto_augment.py")``. A module of a subpackage (``scheduler/cosine_lr.py``) gets
    a stand-in package so that its relative imports resolve. Skips when timm's files are absent."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm's files are not installed (pip install --no-deps timm==0.3.2)")
    root = pathlib.Path(spec.submodule_search_locations[0])

    def load(relative: str):
        path = root / relative
        if not path.exists():
            pytest.skip(f"{path} is missing")
        package = "_timm_" + path.parent.name
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(path.parent)]
        sys.modules[package] = stand_in
        try:
            module_spec = importlib.util.spec_from_file_location(f"{package}.{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        finally:
            for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
                del sys.modules[name]
        return module

    return load
