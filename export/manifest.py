"""Self-describing export artifacts: the manifest beside every model file, the cache key, atomic writes.

Layout written by ``engine export`` and read by the engine's backends::

    <out>/<network>/<cache_key>/model.onnx         (+ model.onnx.data when the weights exceed 2 GB)
    <out>/<network>/<cache_key>/model.plan         (TensorRT artifacts only)
    <out>/<network>/<cache_key>/manifest.json

The cache key hashes exactly what changes the artifact (``key_fields``): the network and its contract version, the
config sections the network is built from, the identity of its weights (the digest of its release files, cached by
size and mtime: ``files_digest``; or what a seeded preset builds them from), its input/output shapes and TensorRT
profile, the precision, the ONNX opset and exporter, and for a plan the TensorRT version, the GPU compute capability
and the builder settings. A directory whose manifest does not hash to its own name, whose manifest was edited, or
whose files differ in size or sha256 from what the manifest lists is invalid: export rebuilds it (or refuses with
``--no-build``), the engine refuses it. Nothing is used on trust.

This module is the one piece of ``export`` that the engine imports (DESIGN.md), so it holds everything both sides
share about artifacts -- config and weight digests, manifest reading and validation, finding an artifact -- and no
heavy import at module level (torch is imported inside the one function that needs it). What a network's tensors
are called and shaped is its contract's (mmgt/contracts.py), read from there by both sides.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mmgt.contract import Contract, resolve_attr

log = logging.getLogger(__name__)

SCHEMA = 1  # manifest layout version; bump when the fields change meaning
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"  # external weights, one file, beside model.onnx
PLAN_NAME = "model.plan"
FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16")
# Defaults of `engine export` (kept here, not in onnx.py / tensorrt.py, so building the parser imports no torch)
DEFAULT_OPSET = 17  # TorchScript exporter; the dynamo exporter writes at least opset 18
DEFAULT_OPT_LEVEL = 3  # TensorRT builder optimisation level: TensorRT's own default; 5 searches longest
DEFAULT_WORKSPACE_GB = 8.0  # TensorRT builder workspace limit
# Config fields that are run-time choices, not part of a network: changing them must not invalidate an artifact.
RUNTIME_CONFIG_FIELDS: Mapping[str, Tuple[str, ...]] = {
    "smga": ("dropout", "diffusion_steps", "cosine_s", "sample_steps", "eta", "guidance"),
}


class ArtifactError(ValueError):
    """An artifact is missing, partial, edited or does not match the model/settings that want to use it."""


# ----------------------------------------------------------------------------------------------------------------
# Digests and the cache key
# ----------------------------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): the text every digest here is taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"export.manifest: cannot put {type(obj).__name__} into a manifest")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(cfg, sections: Sequence[str]) -> str:
    """sha256 of the config sections a network is built from (``Contract.config_sections``), minus its run-time
    fields."""
    data = {}
    for section in sections:
        values = dataclasses.asdict(getattr(cfg, section))
        for name in RUNTIME_CONFIG_FIELDS.get(section, ()):
            values.pop(name, None)
        data[section] = values
    return sha256_text(canonical_json(data))


def weights_digest(modules: Mapping[str, Any], dtype: Optional[str] = None) -> str:
    """sha256 over the state dicts of ``modules`` ({prefix: nn.Module}) in key order.

    Every entry contributes its name, dtype, shape and bytes. ``dtype`` ("float32", "float16", "bfloat16") first
    casts floating tensors, so a model held in fp16 at run time can be matched against the digest that export
    recorded for the fp16 cast of the same fp32 weights (a cast is deterministic).
    """
    import torch  # lazy: this module stays importable without torch

    target = getattr(torch, dtype) if dtype else None
    digest = hashlib.sha256()
    for prefix in sorted(modules):
        state = modules[prefix].state_dict()
        for key in sorted(state):
            t = state[key].detach()
            if target is not None and t.is_floating_point():
                t = t.to(target)
            t = t.contiguous().cpu()
            digest.update(f"{prefix}.{key}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_version(packages: Sequence[str], files: Sequence[Path] = (), dists: Sequence[str] = ()) -> str:
    """20 hex digits of sha256 over the Python sources of ``packages`` (and ``files``) and the installed versions of
    the distributions ``dists``, read without importing any of them: what turns inputs into an artifact or a seed
    into weights, for keys that must change when that code does."""
    import importlib.metadata
    import importlib.util

    digest = hashlib.sha256()
    for package in packages:
        base = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(base.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(base).as_posix()}|".encode())
            digest.update(path.read_bytes())
    for path in files:
        digest.update(f"{Path(path).name}|".encode())
        digest.update(Path(path).read_bytes())
    for dist in dists:
        try:
            digest.update(f"|{dist}=={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"|{dist} missing".encode())
    return digest.hexdigest()[:20]


def network_weights(models: Any, contract: Contract) -> Dict[str, Any]:
    """{path: module} holding the weights of a contract's network in a ModelSet-like object."""
    return {path: resolve_attr(models, path) for path in contract.weights}


def module_float_dtype(modules: Mapping[str, Any]) -> str:
    """Name of the floating dtype the modules hold ("float32", "float16", ...)."""
    for module in modules.values():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                return str(tensor.dtype).replace("torch.", "")
    return "float32"


def cache_key(key_fields: Mapping[str, Any]) -> str:
    """The artifact's directory name: 20 hex digits of sha256(canonical key fields)."""
    return sha256_text(canonical_json(key_fields))[:20]


# ----------------------------------------------------------------------------------------------------------------
# Files: sha256, the digest of weight files (cached), atomic writes
# ----------------------------------------------------------------------------------------------------------------
def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


DIGEST_CACHE = Path(".cache") / "mmgt-digests.json"  # under a weights directory: {file: {size, mtime_ns, sha256}}
RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime's granularity: not recorded


def files_digest(root: Path, paths: Sequence[Path]) -> str:
    """sha256 over the contents of ``paths`` (files, or folders taken whole) under ``root``, without rereading
    gigabytes at every start.

    Each file's sha256 is kept in ``root/.cache/mmgt-digests.json`` with the size and mtime it had; a file whose size
    or mtime differs from the record (rewritten, replaced, touched) is hashed again, the others are not read; a file
    modified in the last two seconds is not recorded (a rewrite within its mtime's granularity would go unseen). The
    digest covers each file's path relative to ``root`` and its sha256, so moving the whole directory changes
    nothing; a missing path counts as missing. Hidden entries (``.cache``, temp files) are not weights and are
    skipped. A read-only ``root`` only costs the rehashing: the record is written when it can be.
    """
    root = Path(root)
    cache_path = root / DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text("utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    entries: List[Tuple[str, str]] = []
    changed = False
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and not _hidden(p, path)) \
            if Path(path).is_dir() else [Path(path)]
        for f in files:
            rel = os.path.relpath(f, root)
            try:
                st = f.stat()
            except OSError:
                entries.append((rel, "missing"))
                continue
            known = cache.get(rel)
            if isinstance(known, dict) and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
                entries.append((rel, known["sha256"]))
                continue
            sha = file_sha256(f)
            log.info("hashed %s (%d bytes)", f, st.st_size)
            entries.append((rel, sha))
            if time.time_ns() - st.st_mtime_ns > RACY_NS:
                cache[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
                changed = True
    if changed:
        try:
            atomic_write_bytes(cache_path, (json.dumps(cache, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        except OSError as e:
            log.debug("%s: digest record not written (%s); the files are hashed again next time", cache_path, e)
    return sha256_text(canonical_json(entries))


def _hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def describe_files(directory: Path, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """{name: {size, sha256}} of files in ``directory``."""
    out = {}
    for name in names:
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: expected artifact file is missing")
        out[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Build a directory under a temp name beside ``final``; on success it replaces ``final`` in one rename.

    On an exception the temp directory is removed and ``final`` is left as it was. An existing ``final`` (stale or
    invalid) is moved aside first and deleted after the rename, so ``final`` is never a mix of old and new files.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------------------
def _body_digest(manifest: Mapping[str, Any]) -> str:
    return sha256_text(canonical_json({k: v for k, v in manifest.items() if k != "manifest_sha256"}))


def make_manifest(key_fields: Mapping[str, Any], directory: Path, files: Sequence[str],
                  info: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The manifest of an artifact built in ``directory``: key fields, cache key, files (size + sha256), info.

    ``info`` holds what describes but does not define the artifact (parity, timings, tool versions, names of the
    io for readers); ``manifest_sha256`` seals the whole text, so an edited manifest is detected.
    """
    manifest: Dict[str, Any] = {
        "schema": SCHEMA,
        "network": key_fields["network"],
        "format": key_fields["format"],
        "precision": key_fields["precision"],
        "cache_key": cache_key(key_fields),
        "key_fields": json.loads(canonical_json(key_fields)),
        "files": describe_files(Path(directory), files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "info": json.loads(canonical_json(dict(info or {}))),
    }
    manifest["manifest_sha256"] = _body_digest(manifest)
    return manifest


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def read_manifest(directory: Path) -> Dict[str, Any]:
    """Parse ``<directory>/manifest.json``; ArtifactError when it is missing or not a manifest."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest (partial or foreign directory)")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{path}: not a schema-{SCHEMA} manifest")
    return manifest


def validate_artifact(directory: Path, expect_key: Optional[str] = None,
                      require: Sequence[str] = (ONNX_NAME,), check_hashes: bool = True) -> Dict[str, Any]:
    """Check an artifact directory end to end and return its manifest; ArtifactError names the first problem.

    Checks: the manifest parses and is sealed (not edited); its key fields hash to its cache key, which is the
    directory name (and ``expect_key`` when given); every file it lists exists with the listed size and sha256;
    the ``require``d files are among them.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = directory / MANIFEST_NAME
    if manifest.get("manifest_sha256") != _body_digest(manifest):
        raise ArtifactError(f"{where}: manifest was modified after export (its seal does not match)")
    key = cache_key(manifest.get("key_fields", {}))
    if manifest.get("cache_key") != key or directory.name != key:
        raise ArtifactError(f"{where}: key fields hash to {key}, manifest says {manifest.get('cache_key')}, "
                            f"directory is {directory.name}")
    if expect_key is not None and key != expect_key:
        raise ArtifactError(f"{where}: cache key {key} is not the expected {expect_key}")
    files = manifest.get("files", {})
    for name in require:
        if name not in files:
            raise ArtifactError(f"{where}: does not list {name}")
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise ArtifactError(f"{path}: {size} bytes, manifest says {meta.get('size')} (truncated or replaced)")
        if check_hashes and file_sha256(path) != meta.get("sha256"):
            raise ArtifactError(f"{path}: sha256 differs from the manifest (file changed after export)")
    return manifest


def artifact_dir(root: Path, network: str, key: str) -> Path:
    return Path(root) / network / key


def find_artifact(root: Path, network: str, want: Mapping[str, Any],
                  check: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None,
                  require: Sequence[str] = (ONNX_NAME,), hint: str = "") -> Tuple[Path, Dict[str, Any]]:
    """The newest valid artifact of ``network`` under ``root`` whose key fields match ``want``.

    ``want`` maps key-field names to required values; a dict value (e.g. ``shapes``) matches when every entry the
    manifest records agrees. ``check(manifest)`` may veto a candidate with a reason (e.g. other weights). Raises
    ArtifactError listing each candidate and why it was refused, ending with ``hint`` (how to export it).
    """
    base = Path(root) / network
    reasons: List[str] = []
    found: List[Tuple[str, Path, Dict[str, Any]]] = []
    candidates = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if base.is_dir() else []
    for directory in candidates:
        try:
            manifest = validate_artifact(directory, require=require, check_hashes=False)
        except ArtifactError as e:
            reasons.append(f"{directory.name}: {e}")
            continue
        why = _mismatch(manifest["key_fields"], want)
        if why is None and check is not None:
            why = check(manifest)
        if why is not None:
            reasons.append(f"{directory.name}: {why}")
            continue
        found.append((manifest.get("created", ""), directory, manifest))
    for _, directory, _ in sorted(found, key=lambda item: item[0], reverse=True):
        try:  # the full check (sha256 of every file) only for the one about to be used
            return directory, validate_artifact(directory, require=require)
        except ArtifactError as e:
            reasons.append(f"{directory.name}: {e}")
    detail = "; ".join(reasons) if reasons else "none exported"
    raise ArtifactError(f"no usable {want.get('format', '')} artifact of {network} under {base} ({detail})"
                        + (f": {hint}" if hint else ""))


def _mismatch(have: Mapping[str, Any], want: Mapping[str, Any]) -> Optional[str]:
    for name, value in want.items():
        got = have.get(name)
        if isinstance(value, Mapping) and isinstance(got, Mapping):
            for sub, sub_value in got.items():
                if sub in value and value[sub] != sub_value:
                    return f"{name}.{sub} is {sub_value}, wanted {value[sub]}"
        elif got != value:
            return f"{name} is {got!r}, wanted {value!r}"
    return None


__all__ = [
    "SCHEMA", "MANIFEST_NAME", "ONNX_NAME", "ONNX_DATA_NAME", "PLAN_NAME", "FORMATS", "PRECISIONS", "DEFAULT_OPSET",
    "DEFAULT_OPT_LEVEL", "DEFAULT_WORKSPACE_GB", "RUNTIME_CONFIG_FIELDS", "ArtifactError", "canonical_json",
    "config_hash", "code_version", "weights_digest", "network_weights", "module_float_dtype", "cache_key",
    "file_sha256", "DIGEST_CACHE", "RACY_NS", "files_digest", "describe_files", "atomic_write_bytes",
    "atomic_directory", "make_manifest", "write_manifest", "read_manifest", "validate_artifact", "artifact_dir",
    "find_artifact",
]
