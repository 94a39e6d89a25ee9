"""The server's avatars: images registered by id (a folder, uploads, the default), prepared on first use and cached.

An avatar is an image of a person; preparing it (CLIP context, reference latent, ReferenceNet bank, initial pose:
``engine.models.prepare_avatar``) takes a few network calls, so prepared avatars are kept, the most recently used
``cache_size`` of them. Images are checked when they are registered, so a session never starts on a bad one:
``add_upload`` answers a bad upload with an ``AvatarError`` that names the problem (not an image, empty, truncated,
too many pixels). Grayscale and transparent images are taken as what a user means by them: gray is widened to RGB, and
transparency is laid over white.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 40_000_000  # an upload above this is refused (a phone photo is ~12 MP; a decompression bomb is far more)
MAX_UPLOAD_BYTES = 20 * 2**20  # bytes of one upload


class AvatarError(ValueError):
    """An avatar image that cannot be used, or an unknown avatar id; the message says which and why."""


@dataclass(frozen=True, eq=False)
class AvatarImage:
    """A registered avatar: its id, where it came from and the RGB pixels."""

    id: str  # the file stem (a folder), "upload-<hash>" (an upload), or the default's name
    source: str  # "default", "folder" or "upload"
    image: np.ndarray  # (H, W, 3) uint8 RGB

    def describe(self) -> Dict:
        return {"id": self.id, "source": self.source, "width": int(self.image.shape[1]),
                "height": int(self.image.shape[0])}


def decode_image(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB; AvatarError naming ``what`` and the problem."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise AvatarError(f"{what}: the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise AvatarError(f"{what}: {w}x{h} is {w * h / 1e6:.1f} megapixels; the limit is "
                                  f"{max_pixels / 1e6:.0f}")
            im.load()  # decodes now: a truncated file fails here, not later in a session
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB")  # transparency over white
            else:
                rgb = im.convert("RGB")  # gray, palette, CMYK ... -> RGB
            return np.asarray(rgb)
    except AvatarError:
        raise
    except UnidentifiedImageError:
        raise AvatarError(f"{what}: not an image (no image format recognised)") from None
    except Image.DecompressionBombError as e:
        raise AvatarError(f"{what}: too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise AvatarError(f"{what}: truncated or corrupt image ({e})") from None


class AvatarStore:
    """Avatar images by id, and their prepared form (``prepare(image) -> avatar``) for the last ``cache_size`` used."""

    def __init__(self, prepare: Callable[[np.ndarray], object], cache_size: int = 8):
        self._prepare = prepare
        self.cache_size = max(1, int(cache_size))
        self._images: "OrderedDict[str, AvatarImage]" = OrderedDict()
        self._prepared: "OrderedDict[str, object]" = OrderedDict()
        self._lock = threading.Lock()
        self.default_id: Optional[str] = None

    # -- registering ---------------------------------------------------------------------------------------------
    def add(self, avatar_id: str, image: np.ndarray, source: str, default: bool = False) -> AvatarImage:
        entry = AvatarImage(avatar_id, source, np.ascontiguousarray(image, np.uint8))
        with self._lock:
            self._images[avatar_id] = entry
            self._prepared.pop(avatar_id, None)  # a new image under an old id is prepared afresh
            if default or self.default_id is None:
                self.default_id = avatar_id
        return entry

    def add_folder(self, folder: Path) -> List[str]:
        """Every image in ``folder`` (id = file stem); AvatarError naming the folder or file when one is unusable."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AvatarError(f"{folder}: no such avatar folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise AvatarError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the avatar folder")
        ids = []
        for path in files:
            self.add(path.stem, decode_image(path.read_bytes(), str(path)), "folder")
            ids.append(path.stem)
        log.info("avatars from %s: %s", folder, ", ".join(ids))
        return ids

    def add_upload(self, data: bytes, filename: str = "upload") -> AvatarImage:
        """An uploaded image: checked, then registered under an id made from its content (the same image uploaded
        twice is one avatar)."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise AvatarError(f"{filename}: {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
        image = decode_image(data, filename)
        avatar_id = "upload-" + hashlib.sha256(data).hexdigest()[:12]
        with self._lock:
            known = self._images.get(avatar_id)
        return known or self.add(avatar_id, image, "upload")

    # -- using ---------------------------------------------------------------------------------------------------
    def list(self) -> List[Dict]:
        with self._lock:
            return [e.describe() for e in self._images.values()]

    def resolve(self, avatar_id: Optional[str]) -> str:
        """The id to use: ``avatar_id``, or the default when None; AvatarError for an unknown id."""
        if avatar_id is None:
            if self.default_id is None:
                raise AvatarError("no avatar is registered")
            return self.default_id
        if not isinstance(avatar_id, str) or avatar_id not in self._images:
            known = ", ".join(list(self._images)[:10])
            raise AvatarError(f"unknown avatar {avatar_id!r}; known: {known}")
        return avatar_id

    def prepared(self, avatar_id: Optional[str] = None):
        """The prepared avatar (prepared now if it is not cached); blocking: call it off the event loop."""
        avatar_id = self.resolve(avatar_id)
        with self._lock:
            if avatar_id in self._prepared:
                self._prepared.move_to_end(avatar_id)
                return self._prepared[avatar_id]
            image = self._images[avatar_id].image
        avatar = self._prepare(image)  # outside the lock: two ids prepare at once
        with self._lock:
            self._prepared[avatar_id] = avatar
            while len(self._prepared) > self.cache_size:
                dropped, _ = self._prepared.popitem(last=False)
                log.debug("avatar %s: dropped from the prepared cache", dropped)
        return avatar

    def seed(self, avatar_id: str, prepared) -> None:
        """Put an avatar prepared elsewhere (e.g. with an initial-pose file) into the cache."""
        with self._lock:
            self._prepared[self.resolve(avatar_id)] = prepared

    def cached_ids(self) -> List[str]:
        with self._lock:
            return list(self._prepared)


__all__ = ["AvatarError", "AvatarImage", "AvatarStore", "decode_image", "MAX_PIXELS", "MAX_UPLOAD_BYTES",
           "IMAGE_SUFFIXES"]
