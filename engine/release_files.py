"""Where every file of the release layout comes from: one table, read by `engine weights fetch` and `check`.

Each :class:`Component` is one line of ``engine weights check``: a hub repository (at a revision), the files the
layout needs from it, and the folder of the weights directory they go to (the paths :class:`mmgt.weights.
ReleaseLayout` reads). A needed file may have alternatives (safetensors first, then the pickle); fetch takes the
first one the repository has, check accepts any one present. Nothing here imports torch or huggingface_hub.

The unilm ``WavLM-Large.pt`` the reference uses has no copy on the Hub (it is published on Azure blob storage and
GitHub releases), so the table takes the transformers conversion microsoft/wavlm-large into ``WavLM-Large/``, which
``ReleaseLayout.wavlm`` reads when no ``WavLM-Large.pt`` is present; a ``WavLM-Large.pt`` put there by hand stands in
for it (``Component.stand_in``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple


@dataclass(frozen=True)
class Component:
    """One part of the release layout and the hub repository it comes from."""

    name: str  # label of the part (its `engine weights check` line)
    repo: str  # hub repository id (a model repository)
    revision: str  # branch, tag or commit of the repository
    folder: str  # where the files go, relative to the weights directory (huggingface_hub's local_dir)
    files: Tuple[Tuple[str, ...], ...]  # per needed file, its paths in the repository, preferred first
    what: str  # what the part is, for messages
    optional: bool = False  # fetched only on request (--with-dwpose); its absence is not a failure
    stand_in: str = ""  # a path (relative to the weights directory) that, when present, replaces this part

    def local(self, root: Path, repo_path: str) -> Path:
        """The local path of one repository file."""
        return Path(root) / self.folder / repo_path

    def present(self, root: Path, alternatives: Tuple[str, ...]) -> Optional[str]:
        """The first of ``alternatives`` present on disk (as a repository path), or None."""
        return next((a for a in alternatives if self.local(root, a).is_file()), None)


MMGT_REPO = "addtime/MMGT_pretrained"

COMPONENTS: Tuple[Component, ...] = (
    Component("smga", MMGT_REPO, "main", "MMGT_pretrained", (("stage_1/audio2pose_best_model.pt",),),
              "Stage I SMGA checkpoint"),
    Component("net", MMGT_REPO, "main", "MMGT_pretrained", (("stage_2/process_2/net-32500.pth",),),
              "Stage II checkpoint (ReferenceNet, denoising UNet, PoseGuider, audio projection)"),
    Component("unet_config", "stable-diffusion-v1-5/stable-diffusion-v1-5", "main", "stable-diffusion-v1-5",
              (("unet/config.json",),), "SD1.5 UNet config"),
    Component("vae", "stabilityai/sd-vae-ft-mse", "main", "sd-vae-ft-mse",
              (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
              "SD VAE (ft-MSE)"),
    Component("image_encoder", "lambdalabs/sd-image-variations-diffusers", "main", "sd-image-variations-diffusers",
              (("image_encoder/config.json",), ("image_encoder/model.safetensors", "image_encoder/pytorch_model.bin")),
              "CLIP image encoder"),
    Component("wav2vec2", "facebook/wav2vec2-base-960h", "main", "wav2vec/wav2vec2-base-960h",
              (("config.json",), ("preprocessor_config.json",), ("model.safetensors", "pytorch_model.bin")),
              "wav2vec2-base-960h (Stage II audio)"),
    Component("wavlm", "microsoft/wavlm-large", "main", "WavLM-Large",
              (("config.json",), ("model.safetensors", "pytorch_model.bin")), "WavLM-Large (Stage I audio)",
              stand_in="WavLM-Large.pt"),
    Component("dwpose", "yzd-v/DWPose", "main", "DWPose", (("yolox_l.onnx",), ("dw-ll_ucoco_384.onnx",)),
              "DWPose initial-pose extractor", optional=True),
)


def components(with_optional: bool = True) -> Tuple[Component, ...]:
    return tuple(c for c in COMPONENTS if with_optional or not c.optional)


# ----------------------------------------------------------------------------------------------------------------
# What fetch recorded: per local file, the repository file it came from (the sizes let check name a truncated file)
# ----------------------------------------------------------------------------------------------------------------
STATE_DIR = Path(".cache") / "mmgt-weights"  # under the weights directory: partial downloads and the record
RECORD_NAME = "fetched.json"


@dataclass(frozen=True)
class FetchedFile:
    """One file as fetch wrote it."""

    repo: str  # repository it came from
    revision: str  # revision asked for
    commit: str  # commit the hub resolved the revision to
    path: str  # path in the repository
    etag: str  # the hub's ETag (sha256 for LFS files, git blob sha1 otherwise)
    size: int  # bytes


class FetchRecord:
    """``<weights>/.cache/mmgt-weights/fetched.json``: {local path relative to the weights dir: FetchedFile}."""

    def __init__(self, root: Path):
        self.path = Path(root) / STATE_DIR / RECORD_NAME
        self.files: Dict[str, FetchedFile] = {}
        if self.path.is_file():
            try:
                self.files = {k: FetchedFile(**v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, TypeError):  # an unreadable record only costs re-verifying the files
                self.files = {}

    def get(self, rel: str) -> Optional[FetchedFile]:
        return self.files.get(rel)

    def put(self, rel: str, entry: FetchedFile) -> None:
        """Record one file and write the record at once (atomic): a killed fetch keeps what it completed."""
        self.files[rel] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: vars(v) for k, v in sorted(self.files.items())}, indent=1))
        tmp.replace(self.path)


def needed_files(root: Path, comps: Tuple[Component, ...]) -> Iterator[Tuple[Component, Tuple[str, ...]]]:
    """(component, alternatives) of every file the layout needs, skipping components whose stand-in is present."""
    for comp in comps:
        if comp.stand_in and (Path(root) / comp.stand_in).exists():
            continue
        for alternatives in comp.files:
            yield comp, alternatives
