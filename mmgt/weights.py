"""Release checkpoints -> modules, strictly; and the reverse, for layout checks.

The release layout (MMGT_SPEC.md section 6) under ``--weights DIR``::

    MMGT_pretrained/stage_1/audio2pose_best_model.pt        SMGA: dict, weights under 'ema_state_dict'
    MMGT_pretrained/stage_2/process_2/net-32500.pth          every trained Stage II weight, by prefix
    stable-diffusion-v1-5/unet/config.json                   SD1.5 UNet config
    sd-vae-ft-mse/                                           diffusers AutoencoderKL
    sd-image-variations-diffusers/image_encoder/             transformers CLIPVisionModelWithProjection
    wav2vec/wav2vec2-base-960h/                              transformers Wav2Vec2Model
    WavLM-Large.pt                                           unilm WavLM checkpoint (or WavLM-Large/, transformers)
    DWPose/{yolox_l.onnx, dw-ll_ucoco_384.onnx}              initial-pose extractor

Rules: checkpoints are read with safetensors or ``torch.load(weights_only=True)``; loading is strict, and one
:class:`WeightsError` names the file and every missing, unexpected or mis-shaped key. Our modules use the release's
key names, so the remap tables below only handle wrappers (``module.``) and the Stage II prefixes.

A pickled checkpoint (``.pt``/``.pth``) may have a *safetensors twin* beside it, written once by ``engine weights
convert`` (:func:`write_twin`): same stem, ``.safetensors``, holding the tensors its loader uses. The twin records the
size and mtime of the pickle it was made from; while they still match, :class:`ReleaseLayout` and
:func:`read_checkpoint` read the twin instead, so a load never unpickles. The pickle is never deleted.

``python -m mmgt.weights --check-layout ../shared/mmgt_keys`` builds the release-size networks on the meta device
(no memory, no weights) and compares their state-dict layout with the key lists of the release.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# torch is imported inside the functions that read or build tensors: the release layout stays light to read
# (`engine export` computes its cache keys from the weight files without torch)
if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec"
PICKLE_SUFFIXES = (".pt", ".pth")  # pickled checkpoints that may have a safetensors twin
# safetensors metadata of a twin: the pickle it was converted from, as it was then (a changed pickle -> stale twin)
TWIN_STAMP_KEYS = ("mmgt_source_name", "mmgt_source_size", "mmgt_source_mtime_ns")

# Stage II: net-32500.pth prefix -> attribute of the Stage II module set (see STAGE2_PARTS).
STAGE2_PREFIXES: Tuple[str, ...] = ("reference_unet.", "denoising_unet.", "pose_guider.", "audioproj.")
# The ModelSet attributes that hold weights, each from its own part of the release layout (ReleaseLayout.sources)
RELEASE_PARTS: Tuple[str, ...] = ("smga", "wavlm", "wav2vec2", "vae", "clip", *(p[:-1] for p in STAGE2_PREFIXES))

# Remap tables: (regex, replacement) applied in order to every key of a checkpoint.
SMGA_REMAP: Tuple[Tuple[str, str], ...] = (
    (r"^module\.", ""),  # DataParallel / DDP wrapper
    (r"^_orig_mod\.", ""),  # torch.compile wrapper
)
STAGE2_REMAP: Tuple[Tuple[str, str], ...] = (
    (r"^module\.", ""),
)


class WeightsError(ValueError):
    """A checkpoint that cannot be used: names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Release file layout
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseLayout:
    """Paths of the release files under one weights directory."""

    root: Path  # the --weights directory

    @property
    def smga(self) -> Path:  # Stage I checkpoint (its safetensors twin when fresh)
        return prefer_twin(self._smga_pickle)

    @property
    def net(self) -> Path:  # every trained Stage II weight (its safetensors twin when fresh)
        return prefer_twin(self._net_pickle)

    @property
    def _smga_pickle(self) -> Path:
        return self.root / "MMGT_pretrained" / "stage_1" / "audio2pose_best_model.pt"

    @property
    def _net_pickle(self) -> Path:
        return self.root / "MMGT_pretrained" / "stage_2" / "process_2" / "net-32500.pth"

    @property
    def unet_config(self) -> Path:  # SD1.5 UNet config.json
        return self.root / "stable-diffusion-v1-5" / "unet" / "config.json"

    @property
    def vae(self) -> Path:  # diffusers AutoencoderKL directory
        return self.root / "sd-vae-ft-mse"

    @property
    def image_encoder(self) -> Path:  # CLIPVisionModelWithProjection directory
        return self.root / "sd-image-variations-diffusers" / "image_encoder"

    @property
    def wav2vec2(self) -> Path:  # Wav2Vec2Model directory
        return self.root / "wav2vec" / "wav2vec2-base-960h"

    @property
    def wavlm(self) -> Path:  # unilm WavLM-Large.pt (or its twin), else a transformers directory WavLM-Large/
        pt, hf = self.root / "WavLM-Large.pt", self.root / "WavLM-Large"
        if not pt.exists() and not safetensors_twin(pt).exists() and hf.is_dir():
            return hf
        return prefer_twin(pt)

    @property
    def dwpose(self) -> Path:  # DWPose ONNX directory
        return self.root / "DWPose"

    def sources(self, part: str) -> Tuple[Path, ...]:
        """The files and folders whose contents decide the weights of ModelSet attribute ``part`` (one of
        ``RELEASE_PARTS``), found without reading any of them.

        A pickled checkpoint stands for its safetensors twin: the loaders read the twin only while it is a faithful
        copy of the pickle (else the pickle), so the pickle's contents decide the weights either way and a
        conversion changes nothing; the twin counts only where the pickle is gone. A Stage II network also depends
        on the UNet config. `engine export` hashes these to key its artifacts without loading a model."""
        stage2 = (_pickle_or_twin(self._net_pickle), self.unet_config)
        table = {"smga": (_pickle_or_twin(self._smga_pickle),), "wav2vec2": (self.wav2vec2,), "vae": (self.vae,),
                 "clip": (self.image_encoder,), **{name[:-1]: stage2 for name in STAGE2_PREFIXES}}
        if part == "wavlm":
            pt = self.root / "WavLM-Large.pt"
            source = _pickle_or_twin(pt)
            return (source,) if source.exists() else (self.root / "WavLM-Large",)
        if part not in table:
            raise KeyError(f"no release files for {part!r}; known: {', '.join(RELEASE_PARTS)}")
        return table[part]


def _pickle_or_twin(pickle_path: Path) -> Path:
    """``pickle_path`` unless only its safetensors twin is there."""
    twin = safetensors_twin(pickle_path)
    return twin if not pickle_path.exists() and twin.exists() else pickle_path


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ----------------------------------------------------------------------------------------------------------------
class _InertRecord:
    """Stands in for a class a checkpoint pickled beside its tensors (e.g. a data normaliser); never executed."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickler with weights-only semantics that tolerates foreign classes.

    ``torch.load(weights_only=True)`` refuses a checkpoint that pickled an object of a class it does not know (the
    SMGA checkpoint carries its training normaliser). This unpickler resolves only torch's tensor/storage rebuild
    functions and plain containers; any other global becomes an inert record: no code of the file is run.
    """

    _ALLOWED = {
        ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_tensor_v3"), ("torch", "Size"), ("torch", "device"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "slice"), ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("numpy.core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):  # noqa: D401
        if (module, name) in self._ALLOWED or (module == "torch" and name.endswith("Storage")) or (
            module == "torch" and name in {"float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"}
        ):
            return super().find_class(module, name)
        if isinstance(name, str) and "Storage" in name:  # handled by torch's own wrapper first
            return super().find_class(module, name)
        return type(name, (_InertRecord,), {"__module__": "mmgt.weights.inert"})


class _TensorOnlyPickleModule:
    """A stand-in for the ``pickle`` module passed to ``torch.load``."""

    Unpickler = _TensorOnlyUnpickler
    load = staticmethod(pickle.load)
    __name__ = "mmgt_tensor_only_pickle"


def safetensors_twin(path: Path | str) -> Path:
    """Where ``engine weights convert`` writes the safetensors copy of a pickled checkpoint: beside it, same stem."""
    return Path(path).with_suffix(".safetensors")


def _source_stamp(path: Path) -> Dict[str, str]:
    st = path.stat()
    return dict(zip(TWIN_STAMP_KEYS, (path.name, str(st.st_size), str(st.st_mtime_ns))))


def safetensors_metadata(path: Path | str) -> Dict[str, str]:
    """The string metadata of a safetensors file (header only); a truncated or corrupt file is a WeightsError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a complete safetensors file ({e}); truncated or corrupt?") from e


def prefer_twin(path: Path | str) -> Path:
    """The file a loader should read for ``path``: the safetensors twin of a pickled checkpoint when it was made from
    the pickle as it is now (or the pickle is gone), else ``path`` itself."""
    p = Path(path)
    twin = safetensors_twin(p)
    if p.suffix not in PICKLE_SUFFIXES or not twin.is_file():
        return p
    if not p.exists():
        return twin
    try:
        meta = safetensors_metadata(twin)
    except WeightsError as e:
        log.warning("%s; reading %s instead", e, p.name)
        return p
    if {k: meta.get(k) for k in TWIN_STAMP_KEYS} == _source_stamp(p):
        return twin
    log.warning("%s: made from another version of %s (run `engine weights convert` again); reading the pickle",
                twin, p.name)
    return p


def write_twin(source: Path | str, tensors: Mapping[str, torch.Tensor],
               metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` as the safetensors twin of the pickled ``source``, atomically, stamped with the source's
    size and mtime; the file is read back and must hold the same keys, dtypes and values before it replaces
    anything. The source is left as it is."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(source)
    twin = safetensors_twin(src)
    plain: Dict[str, torch.Tensor] = {}
    seen = set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        plain[k] = v.clone() if ptr in seen else v  # safetensors refuses tensors that share memory (tied weights)
        seen.add(ptr)
    tmp = twin.with_name(f".{twin.name}.tmp")
    try:
        save_file(plain, str(tmp), metadata={**(metadata or {}), **_source_stamp(src)})
        with safe_open(str(tmp), framework="pt") as f:  # one tensor at a time: no second copy of a large file
            keys = set(f.keys())
            bad = sorted(keys ^ set(plain))
            for k in sorted(keys & set(plain)):
                back = f.get_tensor(k)
                if back.dtype != plain[k].dtype or not torch.equal(back, plain[k]):
                    bad.append(k)
        if bad:
            raise WeightsError(f"{twin}: read back differs from {src.name} at {', '.join(bad[:8])}")
        tmp.replace(twin)
    finally:
        tmp.unlink(missing_ok=True)
    return twin


def read_checkpoint(path: Path | str, prefer_safetensors: bool = True, meta: bool = False) -> dict:
    """Read a checkpoint file into a dict; every failure is a :class:`WeightsError` naming the file.

    ``prefer_safetensors``: read a pickle's fresh safetensors twin instead (:func:`prefer_twin`). ``meta``: shapes
    only, for layout checks of multi-GB files: safetensors tensors come on the meta device from the header, torch
    checkpoints are memory-mapped (their data is not read)."""
    import torch

    p = prefer_twin(path) if prefer_safetensors else Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: file not found")
    size = p.stat().st_size
    if size == 0:
        raise WeightsError(f"{p}: file is empty")
    with open(p, "rb") as f:
        head = f.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        raise WeightsError(f"{p}: is a git-lfs pointer file ({size} bytes), not the weights; run `git lfs pull` in "
                           "the weights repository to fetch the real file")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            if meta:
                with safe_open(str(p), framework="pt") as f:
                    return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            return dict(load_file(str(p), device="cpu"))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{p}: not a readable safetensors file ({e}); truncated or corrupt?") from e
    mmap = meta and zipfile.is_zipfile(p)  # only the zip format maps; a truncated zip fails below, named
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "global" not in str(e).lower():
            raise WeightsError(f"{p}: cannot be unpickled ({e}); truncated or corrupt?") from e
        log.info("%s: pickles non-tensor objects; reading tensors only (inert records, nothing executed)", p)
    except Exception as e:  # zip errors, EOF, bad magic number: truncated or not a checkpoint
        raise WeightsError(f"{p}: cannot be read as a torch checkpoint ({type(e).__name__}: {e}); "
                           "truncated or corrupt?") from e
    try:
        return torch.load(p, map_location="cpu", weights_only=False, pickle_module=_TensorOnlyPickleModule, mmap=mmap)
    except Exception as e:
        raise WeightsError(f"{p}: cannot be read ({type(e).__name__}: {e})") from e


def remap_keys(state: Mapping[str, torch.Tensor], table: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Apply a (regex, replacement) table to every key, in order."""
    out = {}
    for k, v in state.items():
        for pattern, repl in table:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Strict comparison and loading
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LayoutReport:
    """Keys of a model compared with keys of a checkpoint (or of a release key list)."""

    name: str  # what was compared ("smga", "net")
    n_expected: int  # keys in the checkpoint / key list
    missing: List[str] = field(default_factory=list)  # in the model, absent from the checkpoint
    unexpected: List[str] = field(default_factory=list)  # in the checkpoint, absent from the model
    shape_mismatch: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, model shape, ckpt shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def line(self) -> str:
        return (f"{self.name}: missing={len(self.missing)} unexpected={len(self.unexpected)} "
                f"shape_mismatch={len(self.shape_mismatch)}")

    def details(self, limit: int = 12) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{label} keys: {', '.join(keys[:limit])}{more}")
        if self.shape_mismatch:
            items = [f"{k} model {tuple(a)} vs file {tuple(b)}" for k, a, b in self.shape_mismatch[:limit]]
            more = f" (+{len(self.shape_mismatch) - limit} more)" if len(self.shape_mismatch) > limit else ""
            parts.append(f"shape mismatches: {'; '.join(items)}{more}")
        return "; ".join(parts)


def compare_layout(name: str, model_shapes: Mapping[str, Sequence[int]],
                   file_shapes: Mapping[str, Sequence[int]]) -> LayoutReport:
    """Compare two key -> shape maps."""
    rep = LayoutReport(name=name, n_expected=len(file_shapes))
    rep.missing = sorted(k for k in model_shapes if k not in file_shapes)
    rep.unexpected = sorted(k for k in file_shapes if k not in model_shapes)
    rep.shape_mismatch = [(k, tuple(model_shapes[k]), tuple(file_shapes[k])) for k in sorted(model_shapes)
                          if k in file_shapes and tuple(model_shapes[k]) != tuple(file_shapes[k])]
    return rep


def shapes_of(state: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, name: str = "") -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is one WeightsError."""
    rep = compare_layout(name or type(module).__name__, shapes_of(module.state_dict()), shapes_of(state))
    if not rep.ok:
        raise WeightsError(f"{source}: does not match {rep.line()}: {rep.details()}")
    module.load_state_dict(dict(state), strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Stage I: SMGA
# ----------------------------------------------------------------------------------------------------------------
def smga_state_from_checkpoint(obj: Mapping, path: Path | str) -> Dict[str, torch.Tensor]:
    """The SMGA weights of an audio2pose checkpoint dict: 'ema_state_dict' (else 'model_state_dict', else flat)."""
    import torch

    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    for key in ("ema_state_dict", "model_state_dict", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            state = obj[key]
            break
    else:
        state = obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors under 'ema_state_dict' or 'model_state_dict'")
    return remap_keys(tensors, SMGA_REMAP)


def load_smga(model: nn.Module, path: Path | str) -> nn.Module:
    """Strictly load an ``audio2pose_best_model.pt`` (or a .safetensors of the same keys) into ``model``."""
    state = smga_state_from_checkpoint(read_checkpoint(path), path)
    load_strict(model, state, str(path), "smga")
    return model.eval()


def save_smga(model: nn.Module, path: Path | str, epoch: int = 0) -> Path:
    """Write ``model`` as the release does (a dict with 'ema_state_dict' and 'model_state_dict')."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_torch_save({"ema_state_dict": state, "model_state_dict": state, "epoch": epoch}, p)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Stage II: net-32500.pth
# ----------------------------------------------------------------------------------------------------------------
def split_stage2(state: Mapping[str, torch.Tensor], path: Path | str) -> Dict[str, Dict[str, torch.Tensor]]:
    """Split a flat net-32500 state dict by prefix; keys under no known prefix are reported as unexpected."""
    state = remap_keys(state, STAGE2_REMAP)
    parts: Dict[str, Dict[str, torch.Tensor]] = {p[:-1]: {} for p in STAGE2_PREFIXES}
    stray = []
    for k, v in state.items():
        for prefix in STAGE2_PREFIXES:
            if k.startswith(prefix):
                parts[prefix[:-1]][k[len(prefix):]] = v
                break
        else:
            stray.append(k)
    if stray:
        raise WeightsError(f"{path}: keys under no Stage II prefix {STAGE2_PREFIXES}: {', '.join(stray[:12])}"
                           + (f" (+{len(stray) - 12} more)" if len(stray) > 12 else ""))
    return parts


def stage2_tensors(obj, path: Path | str) -> Dict[str, torch.Tensor]:
    """The tensors of a net-32500 checkpoint dict (flat, or under 'state_dict'), keys as in the file."""
    import torch

    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_stage2(modules: Mapping[str, nn.Module], path: Path | str) -> None:
    """Strictly load net-32500.pth into {'reference_unet', 'denoising_unet', 'pose_guider', 'audioproj'} modules.

    All parts are checked before any is loaded, so a bad file leaves every module untouched, and the one error
    lists the problems of every part.
    """
    parts = split_stage2(stage2_tensors(read_checkpoint(path), path), path)
    problems = []
    for name, module in modules.items():
        rep = compare_layout(name, shapes_of(module.state_dict()), shapes_of(parts[name]))
        if not rep.ok:
            problems.append(f"{rep.line()}: {rep.details()}")
    if problems:
        raise WeightsError(f"{path}: does not match the Stage II networks: " + " | ".join(problems))
    for name, module in modules.items():
        module.load_state_dict(parts[name], strict=True)
        module.eval()


def stage2_state_dict(modules: Mapping[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """The reverse: the Stage II modules' weights under the release's prefixed key names."""
    out = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def save_stage2(modules: Mapping[str, nn.Module], path: Path | str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({k: v.detach().cpu().clone() for k, v in stage2_state_dict(modules).items()}, p)
    return p


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def stage2_builders(cfg) -> Dict[str, Callable[[], nn.Module]]:
    """Constructors of the net-32500 networks under their checkpoint prefixes (meta-device layout checks use them
    too)."""
    from .audio_proj import AudioProjModel
    from .pose_guider import PoseGuider
    from .reference_net import ReferenceNet
    from .unet3d import UNet3D

    return {
        "reference_unet": lambda: ReferenceNet(cfg.unet),
        "denoising_unet": lambda: UNet3D(cfg.unet),
        "pose_guider": lambda: PoseGuider(cfg.pose_guider),
        "audioproj": lambda: AudioProjModel(cfg.audio_proj),
    }


# ----------------------------------------------------------------------------------------------------------------
# Layout check against ../shared/mmgt_keys
# ----------------------------------------------------------------------------------------------------------------
def _meta_shapes(build: Callable[[], nn.Module]) -> Dict[str, Tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        module = build()
    return shapes_of(module.state_dict())


def release_layouts(cfg=None) -> Dict[str, Callable[[], Dict[str, Tuple[int, ...]]]]:
    """Per checkpoint name, a function giving our model's key -> shape map at release size (meta device)."""
    from .config import MMGT

    cfg = cfg or MMGT

    def smga():
        from .smga import SMGA

        return _meta_shapes(lambda: SMGA(cfg.smga))

    def net():
        shapes = {}
        for name, build in stage2_builders(cfg).items():
            shapes.update({f"{name}.{k}": s for k, s in _meta_shapes(build).items()})
        return shapes

    return {"smga": smga, "net": net}


KEY_FILES = {"smga": "smga_gesture_decoder_keys_shapes.json", "net": "net_state_dict_keys_shapes.json"}

# What each release checkpoint's loader takes from the file (also what its safetensors twin holds).
CHECKPOINT_TENSORS: Dict[str, Callable[[Mapping, Path | str], Dict[str, torch.Tensor]]] = {
    "smga": smga_state_from_checkpoint,
    "net": lambda obj, path: remap_keys(stage2_tensors(obj, path), STAGE2_REMAP),
}


def check_checkpoint(path: Path | str, name: str, cfg=None) -> LayoutReport:
    """The strict key check of one release checkpoint ('smga' or 'net') against ``cfg``'s networks, without loading
    either: the networks are built on the meta device and the file's tensor data is not read."""
    obj = read_checkpoint(path, meta=True)
    return compare_layout(name, release_layouts(cfg)[name](), shapes_of(CHECKPOINT_TENSORS[name](obj, path)))


def check_layout(keys_dir: Path | str, names: Iterable[str] = ("smga", "net")) -> List[LayoutReport]:
    """Compare the release-size models (built on the meta device) with the release key lists."""
    keys_dir = Path(keys_dir)
    layouts = release_layouts()
    reports = []
    for name in names:
        file_shapes = json.loads((keys_dir / KEY_FILES[name]).read_text())
        reports.append(compare_layout(name, layouts[name](), file_shapes))
    return reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmgt.weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-layout", metavar="KEYS_DIR", required=True,
                    help="directory of the release key lists (e.g. ../shared/mmgt_keys)")
    ap.add_argument("--only", choices=sorted(KEY_FILES), action="append",
                    help="check only this checkpoint (repeatable); default: all")
    args = ap.parse_args(argv)
    ok = True
    for rep in check_layout(args.check_layout, args.only or tuple(KEY_FILES)):
        print(rep.line() + f" ({rep.n_expected} keys)")
        if not rep.ok:
            print("  " + rep.details(), file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
