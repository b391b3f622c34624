"""Named pretrained CLIPs: OpenAI's ResNet names and open_clip's ``ARCH/tag`` names, resolved to files.

    entry = pretrained.lookup("ViT-B-32/laion2b_s34b_b79k")   # or "RN50", "RN50/yfcc15m", ...
    path = pretrained.fetch(entry)                            # a cached file or HF-format directory

Each entry records where the weights live (an HF hub repo, or a URL of a state-dict file) and the
architecture facts a state dict cannot tell: the activation (OpenAI's and open_clip's
``*-quickgelu`` models use QuickGELU, open_clip's LAION/DataComp models GELU), attention heads where
open_clip's are not width / 64 (ViT-H/g/bigG), and the image normalization it was trained with
(``CLIPConfig.image_mean`` / ``image_std``, applied by the model to the pipeline's OpenAI-normalized input).
The table follows open_clip's ``pretrained.py`` for the OpenAI-layout architectures (ResNet and
ViT CLIPs); OpenAI's ViT names ("ViT-B/32", ...) resolve to their HF hub copies in ``weights``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import time

from absl import logging

from jaxgist.models.clip.model import OPENAI_MEAN, OPENAI_STD

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    name: str
    act: str  # "quick_gelu" or "gelu"
    hf_hub: str = ""  # an HF hub repo: HF format (config.json) where it has one, else open_clip's files
    url: str = ""  # a state-dict file (OpenAI's TorchScript archives, open_clip's release files)
    preset: str = ""  # the OpenAI preset of the same sizes (its config without downloading weights)
    vision_heads: int | None = None  # when not vision width / 64
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @property
    def sha256(self) -> str:
        """OpenAI's URLs carry the file's sha256 as their second-to-last component."""
        parts = self.url.rstrip("/").split("/")
        return parts[-2] if len(parts) > 1 and re.fullmatch(r"[0-9a-f]{64}", parts[-2]) else ""


_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_RELEASES = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights"
_OPENAI_RN = {
    "RN50": f"{_OPENAI}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_OPENAI}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_OPENAI}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_OPENAI}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_OPENAI}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
}
_OPENAI_VIT = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14", "ViT-L-14-336": "ViT-L/14@336px"}


def _table() -> dict[str, Pretrained]:
    out: dict[str, Pretrained] = {}

    def add(name, act, **kw):
        out[name] = Pretrained(name=name, act=act, **kw)

    for arch, url in _OPENAI_RN.items():
        add(arch, "quick_gelu", url=url, preset=arch)  # OpenAI's names
        for suffix in ("", "-quickgelu"):
            add(f"{arch}{suffix}/openai", "quick_gelu", url=url, preset=arch)
    for arch in ("RN50", "RN101"):  # open_clip's own ResNets were trained with QuickGELU
        tags = {"RN50": {"yfcc15m": "rn50-quickgelu-yfcc15m-455df137.pt", "cc12m": "rn50-quickgelu-cc12m-f000538c.pt"},
                "RN101": {"yfcc15m": "rn101-quickgelu-yfcc15m-3e04b30e.pt"}}[arch]
        for tag, file in tags.items():
            for suffix in ("", "-quickgelu"):
                add(f"{arch}{suffix}/{tag}", "quick_gelu", url=f"{_RELEASES}/{file}", preset=arch)
    for arch, preset in _OPENAI_VIT.items():  # OpenAI's ViTs under open_clip's names: their HF copies
        add(f"{arch}/openai", "quick_gelu", hf_hub="", preset=preset)
    vit_b32 = dict(preset="ViT-B/32")
    for tag, file in (("laion400m_e31", "vit_b_32-quickgelu-laion400m_e31-d867053b.pt"),
                      ("laion400m_e32", "vit_b_32-quickgelu-laion400m_e32-46683a32.pt")):
        for suffix in ("", "-quickgelu"):
            add(f"ViT-B-32{suffix}/{tag}", "quick_gelu", url=f"{_RELEASES}/{file}", **vit_b32)
    add("ViT-B-32/laion2b_e16", "gelu", url=f"{_RELEASES}/vit_b_32-laion2b_e16-af8dbd0c.pth", **vit_b32)
    add("ViT-B-32/laion2b_s34b_b79k", "gelu", hf_hub="laion/CLIP-ViT-B-32-laion2B-s34B-b79K", **vit_b32)
    add("ViT-B-32/datacomp_xl_s13b_b90k", "gelu", hf_hub="laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", **vit_b32)
    vit_b16 = dict(preset="ViT-B/16")
    add("ViT-B-16/laion400m_e31", "gelu", url=f"{_RELEASES}/vit_b_16-laion400m_e31-00efa78f.pt", **vit_b16)
    add("ViT-B-16/laion400m_e32", "gelu", url=f"{_RELEASES}/vit_b_16-laion400m_e32-55e67d44.pt", **vit_b16)
    add("ViT-B-16/laion2b_s34b_b88k", "gelu", hf_hub="laion/CLIP-ViT-B-16-laion2B-s34B-b88K", **vit_b16)
    add("ViT-B-16/datacomp_xl_s13b_b90k", "gelu", hf_hub="laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", **vit_b16)
    add("ViT-B-16/datacomp_l_s1b_b8k", "gelu", hf_hub="laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K", **vit_b16)
    vit_l14 = dict(preset="ViT-L/14")
    add("ViT-L-14/laion400m_e31", "gelu", url=f"{_RELEASES}/vit_l_14-laion400m_e31-69988bb6.pt", **vit_l14)
    add("ViT-L-14/laion400m_e32", "gelu", url=f"{_RELEASES}/vit_l_14-laion400m_e32-3d133497.pt", **vit_l14)
    add("ViT-L-14/laion2b_s32b_b82k", "gelu", hf_hub="laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
        mean=INCEPTION_MEAN, std=INCEPTION_STD, **vit_l14)
    add("ViT-L-14/datacomp_xl_s13b_b90k", "gelu", hf_hub="laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", **vit_l14)
    add("ViT-H-14/laion2b_s32b_b79k", "gelu", hf_hub="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", vision_heads=16)
    add("ViT-g-14/laion2b_s12b_b42k", "gelu", hf_hub="laion/CLIP-ViT-g-14-laion2B-s12B-b42K", vision_heads=16)
    add("ViT-g-14/laion2b_s34b_b88k", "gelu", hf_hub="laion/CLIP-ViT-g-14-laion2B-s34B-b88K", vision_heads=16)
    add("ViT-bigG-14/laion2b_s39b_b160k", "gelu", hf_hub="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", vision_heads=16)
    return out


PRETRAINED: dict[str, Pretrained] = _table()


def lookup(name: str) -> Pretrained | None:
    """The entry of an OpenAI ResNet name ("RN50") or an open_clip ``ARCH/tag`` name (``ARCH:tag`` too)."""
    return PRETRAINED.get(str(name).replace(":", "/", 1) if ":" in str(name) else str(name))


def cache_dir() -> pathlib.Path:
    """Where downloaded checkpoints go: $JAXGIST_CACHE/checkpoints, else ~/.cache/jaxgist/checkpoints."""
    root = os.environ.get("JAXGIST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxgist")
    return pathlib.Path(root) / "checkpoints"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, sha256: str = "") -> pathlib.Path:
    """``url`` into the cache (once; a partial download never takes the final name), checked against
    ``sha256`` where known. Raises FileNotFoundError naming the URL when it cannot be fetched."""
    import urllib.request

    target = cache_dir() / url.rstrip("/").split("/")[-1]
    if target.exists() and (not sha256 or _sha256(target) == sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    logging.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, time.monotonic()
            while block := response.read(1 << 22):
                out.write(block)
                done += len(block)
                if time.monotonic() - last > 10:
                    logging.info("  %.0f of %.0f MB", done / 1e6, total / 1e6)
                    last = time.monotonic()
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(f"downloading {url} failed: {e}") from e
    if sha256 and (got := _sha256(partial)) != sha256:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(f"downloading {url}: sha256 {got} does not match the expected {sha256}")
    os.replace(partial, target)
    return target


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def fetch_hub(repo: str) -> tuple[pathlib.Path, bool]:
    """(local path, HF format?) of a hub repo: its HF-format directory when it has one, else its
    open_clip state-dict file (with ``open_clip_config.json`` beside it)."""
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    try:
        files = set(list_repo_files(repo))
        if "config.json" in files and files & set(_HF_WEIGHTS):
            return pathlib.Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors",
                                                                        "model.safetensors.index.json",
                                                                        "model-*.safetensors"]
                                                  if files & {"model.safetensors", "model.safetensors.index.json"}
                                                  else ["config.json", "pytorch_model.bin"])), True
        weights = next((f for f in _OPEN_CLIP_WEIGHTS if f in files), None)
        if weights is None:
            raise FileNotFoundError(f"the hub repo {repo} has neither HF-format nor open_clip weights: {sorted(files)}")
        if "open_clip_config.json" in files:
            hf_hub_download(repo, "open_clip_config.json")
        return pathlib.Path(hf_hub_download(repo, weights)), False
    except FileNotFoundError:
        raise
    except Exception as e:  # no network, no such repo, an auth wall
        raise FileNotFoundError(f"downloading {repo!r} from the HF hub failed: {type(e).__name__}: {e}") from e


def open_clip_act(config_file: pathlib.Path) -> str | None:
    """The activation an ``open_clip_config.json`` records (its ``model_cfg.quick_gelu``), or None."""
    import json

    if not config_file.is_file():
        return None
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: malformed JSON ({e})") from e
    model_cfg = cfg.get("model_cfg", cfg)
    return "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
