"""`engine weights fetch | check | convert`: from a fresh machine to a release layout that `--weights DIR` reads.

    engine weights fetch DIR [--with-dwpose]    every file the layout needs, from its hub repository (resumable)
    engine weights check DIR [--preset NAME]    one line per component: present, size, intact, strict key check
    engine weights convert DIR                  the pickled checkpoints to safetensors twins, once

Where each file comes from is the table of engine/release_files.py. Fetch goes through huggingface_hub, so
HF_ENDPOINT (a mirror), HF_TOKEN (gated or private repositories) and HF_HUB_OFFLINE (use what is on disk) apply.
It shows the total size first, then one progress bar; a partial file is kept under DIR/.cache/mmgt-weights/ and a
re-run asks the hub only for its missing bytes (an HTTP range), while complete files are skipped. Every file is
checked against the hub's checksum (its ETag) before it is moved into place.

Parser building imports neither torch nor huggingface_hub; the handlers import what they need.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from engine.options import DefaultsHelpFormatter
from engine.release_files import STATE_DIR, Component, FetchedFile, FetchRecord, components, needed_files

log = logging.getLogger("engine.weights")

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec"  # the first bytes of a git-lfs pointer file
HASH_BLOCK = 8 << 20  # bytes per read when hashing a file


class FetchError(Exception):
    """A fetch that cannot go on: one line naming the file, repository or setting and what to do."""


def _size(n: float) -> str:
    from tqdm import tqdm

    return tqdm.format_sizeof(n, suffix="B", divisor=1024)


def _rel(root: Path, path: Path) -> str:
    return Path(path).relative_to(root).as_posix()


# ----------------------------------------------------------------------------------------------------------------
# Checksums: the hub's ETag is the sha256 of an LFS file and the git blob sha1 of any other file
# ----------------------------------------------------------------------------------------------------------------
def etag_matches(path: Path, etag: str) -> Optional[bool]:
    """Whether ``path`` has the content the ETag names (as huggingface_hub verifies a download: sha256 of an LFS
    file, git blob sha1 of a small one); None when the ETag is neither (it cannot be verified)."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    etag = etag.strip('"').lower()
    if not all(c in "0123456789abcdef" for c in etag) or len(etag) not in (40, 64):
        return None
    with open(path, "rb") as f:
        return (sha_fileobj(f, HASH_BLOCK).hex() if len(etag) == 64 else git_hash(f.read())) == etag


# ----------------------------------------------------------------------------------------------------------------
# fetch
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PlannedFile:
    """One file of the layout, as the hub describes it now."""

    comp: Component  # the component it belongs to
    repo_path: str  # path in the repository (the first alternative the repository has)
    rel: str  # path under the weights directory
    url: str  # the hub's resolve address of the file
    etag: str  # the hub's ETag
    commit: str  # the commit the revision resolved to
    size: int  # bytes
    done: bool  # complete on disk already
    partial: int  # bytes of an interrupted download already on disk


def _partial_path(root: Path, f: PlannedFile) -> Path:
    return root / STATE_DIR / "partial" / f"{f.rel}.{f.etag.strip(chr(34))[:16]}.part"


def _plan_file(root: Path, comp: Component, alternatives: Tuple[str, ...], record: FetchRecord) -> PlannedFile:
    """Ask the hub (one HEAD) for the first of ``alternatives`` the repository has; see what is on disk."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, \
        RevisionNotFoundError

    for repo_path in alternatives:
        url = hf_hub_url(comp.repo, repo_path, revision=comp.revision)
        try:
            meta = get_hf_file_metadata(url)
        except EntryNotFoundError:
            continue
        except GatedRepoError as e:
            raise FetchError(f"{comp.repo} is gated: accept its terms on the hub and set HF_TOKEN ({e})") from e
        except RepositoryNotFoundError as e:
            raise FetchError(f"{comp.repo}: repository not found or not accessible (a private one needs HF_TOKEN)"
                             ) from e
        except RevisionNotFoundError as e:
            raise FetchError(f"{comp.repo}: no revision {comp.revision!r}") from e
        if meta.etag is None or meta.commit_hash is None or meta.size is None:
            raise FetchError(f"{url}: the server gave no ETag, commit or size; is HF_ENDPOINT a Hugging Face hub?")
        local = comp.local(root, repo_path)
        rel = _rel(root, local)
        f = PlannedFile(comp, repo_path, rel, url, meta.etag, meta.commit_hash, meta.size, done=False, partial=0)
        rec = record.get(rel)
        if local.is_file() and local.stat().st_size == meta.size:
            if rec is not None and rec.etag == meta.etag and rec.size == meta.size:
                f.done = True
            elif etag_matches(local, meta.etag):  # placed by hand or by another tool: adopt it once verified
                f.done = True
                record.put(rel, FetchedFile(comp.repo, comp.revision, meta.commit_hash, repo_path, meta.etag,
                                            meta.size))
        part = _partial_path(root, f)
        if not f.done and part.is_file():
            f.partial = part.stat().st_size if part.stat().st_size <= meta.size else 0
        return f
    raise FetchError(f"{comp.repo}@{comp.revision} has none of {', '.join(alternatives)} ({comp.what})")


def _bar_into(total_bar):
    """A stand-in for huggingface_hub's per-file progress bar that counts into the one bar of the whole fetch."""

    class FileBar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n: int = 1) -> None:
            total_bar.update(n)

        def close(self) -> None:
            pass

    return FileBar


def _download(root: Path, f: PlannedFile, bar, record: FetchRecord) -> None:
    """Download one file into its partial file (resuming it), verify it, then move it into place."""
    from urllib.parse import urlparse

    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    # 1. where to GET it now: the hub redirects large files to signed CDN addresses that expire, so each file is
    # resolved right before its download, not when the fetch was planned (a long download comes first)
    meta = get_hf_file_metadata(f.url)
    if meta.etag != f.etag:
        raise FetchError(f"{f.rel}: {f.comp.repo}/{f.repo_path} changed on the hub during the fetch; run it again")
    url = meta.location or f.url
    part = _partial_path(root, f)
    part.parent.mkdir(parents=True, exist_ok=True)
    for stale in part.parent.glob(f"{Path(f.rel).name}.*.part"):  # partial downloads of another version
        if stale != part:
            stale.unlink()
    headers = build_hf_headers()  # HF_TOKEN, user agent
    if urlparse(url).netloc != urlparse(f.url).netloc:
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
    # 2. append to the partial file from its last byte (an HTTP range), then verify and move into place
    bar.set_description(Path(f.rel).name)
    with open(part, "ab") as out:
        http_get(url, out, resume_size=part.stat().st_size, headers=headers, expected_size=f.size,
                 displayed_filename=f.rel, tqdm_class=_bar_into(bar))
    if etag_matches(part, f.etag) is False:
        part.unlink()
        raise FetchError(f"{f.rel}: the downloaded bytes do not match the hub's checksum {f.etag} "
                         f"({f.comp.repo}/{f.repo_path}); run fetch again to download it anew")
    local = root / f.rel
    local.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, local)
    record.put(f.rel, FetchedFile(f.comp.repo, f.comp.revision, f.commit, f.repo_path, f.etag, f.size))


def fetch(root: Path, with_optional: bool, quiet: bool = False) -> str:
    """Bring the layout under ``root`` up to date with the table; returns the one-line result."""
    from huggingface_hub import constants
    from tqdm import tqdm

    root = Path(root)
    comps = components(with_optional)
    record = FetchRecord(root)
    # 1. offline: nothing is asked of the hub; the files must be on disk
    if constants.HF_HUB_OFFLINE:
        needed = list(needed_files(root, comps))
        missing = [_rel(root, c.local(root, alts[0])) for c, alts in needed if c.present(root, alts) is None]
        if missing:
            raise FetchError(f"HF_HUB_OFFLINE is set and {len(missing)} of {len(needed)} files are missing in {root}: "
                             f"{', '.join(missing)}; unset HF_HUB_OFFLINE to download them")
        return f"offline: all {len(needed)} files are in {root} (not compared with the hub); next: engine weights " \
               f"check {root}"
    # 2. plan: one HEAD per file gives its size, checksum and commit
    root.mkdir(parents=True, exist_ok=True)
    try:
        plan = [_plan_file(root, comp, alts, record) for comp, alts in needed_files(root, comps)]
    except FetchError:
        raise
    except Exception as e:  # connection refused, DNS, proxy, HTTP errors: one line
        raise FetchError(f"cannot reach {constants.ENDPOINT} ({type(e).__name__}: {e}); set HF_ENDPOINT for a "
                         f"mirror, or HF_HUB_OFFLINE=1 to use the files on disk") from e
    todo = [f for f in plan if not f.done]
    total, have = sum(f.size for f in todo), sum(f.partial for f in todo)
    repos = sorted({f.comp.repo for f in plan})
    log.info("%d files from %d repositories (%s in all): %d to download, %s%s", len(plan), len(repos),
             _size(sum(f.size for f in plan)), len(todo), _size(total - have),
             f" (resuming {_size(have)} already on disk)" if have else "")
    # 3. download, one bar for the whole fetch
    with tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc="fetch",
              disable=True if quiet else None) as bar:
        for f in todo:
            try:
                _download(root, f, bar, record)
            except FetchError:
                raise
            except Exception as e:  # network errors after huggingface_hub's retries, HTTP errors, a full disk
                raise FetchError(f"{f.rel} ({f.comp.repo}/{f.repo_path}): {type(e).__name__}: {e}; run fetch again "
                                 "to resume") from e
    return (f"fetched {len(todo)} of {len(plan)} files ({_size(total - have)}) into {root}"
            f"{f'; {len(plan) - len(todo)} were complete' if len(plan) > len(todo) else ''}; next: engine weights "
            f"check {root}")


def quiet_libraries(verbose: int, loaders: bool) -> None:
    """huggingface_hub's HTTP client logs every request at INFO and (``loaders``) transformers draws a bar per loaded
    model: the command's own log and bar say what matters (-vv shows them again)."""
    if verbose < 2:
        for name in ("httpx", "httpx2", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if verbose < 2 and loaders:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # transformers is a dependency of the loaders; without it check reports them broken
            pass


def cmd_fetch(args) -> int:
    quiet_libraries(args.verbose, loaders=False)
    try:
        print(fetch(args.dir, args.with_dwpose, quiet=args.quiet))
        return 0
    except FetchError as e:
        print(f"engine weights fetch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("engine weights fetch: interrupted; run it again to resume where it stopped", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------------------------
def file_problem(path: Path, fetched: Optional[FetchedFile]) -> Optional[str]:
    """What is wrong with one file at the file level (before any loader runs), or None."""
    from mmgt.weights import WeightsError, safetensors_metadata

    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with open(path, "rb") as fh:
        head = fh.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        return (f"a git-lfs pointer ({size} bytes), not the file itself: run `engine weights fetch` "
                "(or `git lfs pull` where it came from a git clone)")
    if fetched is not None and size < fetched.size:
        return f"truncated: {size} of {fetched.size} bytes"
    if fetched is not None and size > fetched.size:
        return f"{size} bytes, but {fetched.size} were fetched: changed since; run `engine weights fetch` again"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON ({e}); truncated or corrupt"
    elif path.suffix == ".safetensors":
        try:
            safetensors_metadata(path)
        except WeightsError as e:
            return str(e).split(": ", 1)[-1]
    elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        return "not a complete torch checkpoint (no zip directory, not a pickle); truncated or corrupt"
    return None


def _checkpoint_check(name: str) -> Callable:
    def check(layout, cfg) -> str:
        from mmgt.weights import WeightsError, check_checkpoint

        path = getattr(layout, name)
        rep = check_checkpoint(path, name, cfg)
        if not rep.ok:
            raise WeightsError(f"{path}: does not match the {cfg.name} networks: {rep.line()}: {rep.details()}")
        return f"{rep.n_expected} keys match the {cfg.name} networks" + (
            f" (read from its safetensors twin {path.name})" if path.suffix == ".safetensors" else "")
    return check


def _n_params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,} parameters"


def _check_unet_config(layout, cfg) -> str:
    from mmgt.pipeline import check_unet_config

    check_unet_config(layout.unet_config, cfg)
    return f"matches the {cfg.name} UNet"


def _check_vae(layout, cfg) -> str:
    from mmgt.vae import load_vae

    return f"loads strictly ({_n_params(load_vae(layout.vae))})"


def _check_clip(layout, cfg) -> str:
    from mmgt.image_encoder import load_clip

    return f"loads strictly ({_n_params(load_clip(layout.image_encoder))})"


def _check_wav2vec2(layout, cfg) -> str:
    from mmgt.speech_encoders import load_wav2vec2

    return f"loads strictly at the {cfg.name} sizes ({_n_params(load_wav2vec2(layout.wav2vec2, cfg.wav2vec2))})"


def _check_wavlm(layout, cfg) -> str:
    from mmgt.speech_encoders import load_wavlm

    model = load_wavlm(layout.wavlm, cfg.wavlm)
    return f"{layout.wavlm.name} loads strictly at the {cfg.name} sizes ({_n_params(model)})"


def _check_dwpose(layout, cfg) -> str:
    import onnxruntime as ort

    from mmgt.init_pose import DET_FILE, POSE_FILE

    for rel in (DET_FILE, POSE_FILE):
        try:
            ort.InferenceSession(str(layout.root / rel), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types
            raise ValueError(f"{layout.root / rel}: onnxruntime cannot load it ({e})") from e
    return "both ONNX models load in onnxruntime"


# The strict check of each component, with the loader the engine uses for it: name -> (ReleaseLayout, cfg) -> detail
STRICT_CHECKS: Dict[str, Callable] = {
    "smga": _checkpoint_check("smga"), "net": _checkpoint_check("net"), "unet_config": _check_unet_config,
    "vae": _check_vae, "image_encoder": _check_clip, "wav2vec2": _check_wav2vec2, "wavlm": _check_wavlm,
    "dwpose": _check_dwpose,
}


@dataclass(frozen=True)
class CheckLine:
    """The verdict on one component."""

    name: str  # component name
    usable: bool  # the engine can load it (an absent optional component counts as usable)
    state: str  # "ok" | "FAILED" | "absent"
    detail: str  # the file(s), size and what the strict check found, or every problem found

    @property
    def text(self) -> str:  # the line printed
        return f"{self.name}: {self.state} {self.detail}"


def check_component(root: Path, comp: Component, cfg, record: FetchRecord) -> CheckLine:
    from mmgt.weights import ReleaseLayout

    # 1. files: present, not a pointer, not truncated (a stand-in such as WavLM-Large.pt replaces the table's files)
    if comp.stand_in and (root / comp.stand_in).exists():
        files = [root / comp.stand_in]
        problem = file_problem(files[0], None)
        problems = [f"{comp.stand_in}: {problem}"] if problem else []
    else:
        files, problems = [], []
        for alternatives in comp.files:
            have = comp.present(root, alternatives)
            if have is None:
                problems.append(f"{_rel(root, comp.local(root, alternatives[0]))}: missing")
                continue
            path = comp.local(root, have)
            files.append(path)
            problem = file_problem(path, record.get(_rel(root, path)))
            if problem:
                problems.append(f"{_rel(root, path)}: {problem}")
    if comp.optional and not files:
        return CheckLine(comp.name, True, "absent", f"(optional {comp.what}; `engine weights fetch DIR "
                                                    "--with-dwpose` gets it)")
    if problems:
        hint = "; run `engine weights fetch DIR`" if any(p.endswith(": missing") for p in problems) else ""
        return CheckLine(comp.name, False, "FAILED", f"{'; '.join(problems)}{hint}")
    # 2. the strict load (or key check) of the loader the engine uses
    size = _size(sum(p.stat().st_size for p in files))
    where = f"{_rel(root, files[0])} ({size})" if len(files) == 1 else f"{comp.folder}/ ({len(files)} files, {size})"
    try:
        detail = STRICT_CHECKS[comp.name](ReleaseLayout(root), cfg)
    except Exception as e:  # the loaders' errors name the file and the keys
        return CheckLine(comp.name, False, "FAILED", f"{where}: {e}")
    return CheckLine(comp.name, True, "ok", f"{where}: {detail}")


def check(root: Path, cfg) -> List[CheckLine]:
    """One verdict per component of the table (optional ones included: absent is fine, broken is not)."""
    root = Path(root)
    record = FetchRecord(root)
    return [check_component(root, comp, cfg, record) for comp in components(with_optional=True)]


def cmd_check(args) -> int:
    from mmgt.config import get_preset

    if not Path(args.dir).is_dir():
        print(f"engine weights check: error: {args.dir}: weights directory not found", file=sys.stderr)
        return 1
    quiet_libraries(args.verbose, loaders=True)
    lines = check(args.dir, get_preset(args.preset))
    for line in lines:
        print(line.text)
    bad = [line.name for line in lines if not line.usable]
    print(f"{len(lines) - len(bad)} of {len(lines)} components usable" + (f"; unusable: {', '.join(bad)}" if bad
                                                                            else f"; --weights {args.dir} is ready"))
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------
def _twin_content(name: str) -> Callable:
    """(checkpoint object, path) -> (tensors, metadata) of a component's safetensors twin."""
    if name == "wavlm":
        from mmgt.speech_encoders import wavlm_twin_content

        return wavlm_twin_content
    from mmgt.weights import CHECKPOINT_TENSORS

    return lambda obj, path: (CHECKPOINT_TENSORS[name](obj, path), {})


def _pickles(root: Path) -> List[Tuple[str, Path]]:
    """(component, pickled checkpoint) of the layout, from the table: the MMGT checkpoints and WavLM-Large.pt."""
    out = []
    for comp in components():
        if comp.stand_in.endswith((".pt", ".pth")):
            out.append((comp.name, root / comp.stand_in))
        out += [(comp.name, comp.local(root, alts[0])) for alts in comp.files if alts[0].endswith((".pt", ".pth"))]
    return out


def convert(root: Path) -> Tuple[List[str], bool]:
    """Write the missing or stale safetensors twins; returns (one line per checkpoint, all fine)."""
    from mmgt.weights import prefer_twin, read_checkpoint, safetensors_twin, write_twin

    root, lines, ok = Path(root), [], True
    for name, src in _pickles(root):
        twin = safetensors_twin(src)
        if not src.is_file():
            lines.append(f"{name}: {_rel(root, src)} not present; nothing to convert")
            continue
        if prefer_twin(src) == twin:
            lines.append(f"{name}: {_rel(root, twin)} is up to date")
            continue
        try:
            tensors, metadata = _twin_content(name)(read_checkpoint(src, prefer_safetensors=False), src)
            write_twin(src, tensors, metadata)
        except Exception as e:  # WeightsError / ValueError name the file
            ok = False
            lines.append(f"{name}: FAILED {e}")
            continue
        lines.append(f"{name}: wrote {_rel(root, twin)} ({len(tensors)} tensors, {_size(twin.stat().st_size)}); "
                     f"loads read it instead of {src.name}, which stays")
    return lines, ok


def cmd_convert(args) -> int:
    if not Path(args.dir).is_dir():
        print(f"engine weights convert: error: {args.dir}: weights directory not found", file=sys.stderr)
        return 1
    lines, ok = convert(args.dir)
    for line in lines:
        print(line)
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------
def add_weights_parser(subparsers) -> None:
    from mmgt.config import PRESETS

    w = subparsers.add_parser("weights", help="fetch, check and convert the release weights (`--weights DIR`)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = w.add_subparsers(dest="weights_action", metavar="ACTION", required=True)

    f = actions.add_parser("fetch", help="download every file of the release layout from its hub repository",
                           formatter_class=DefaultsHelpFormatter,
                           description="Download exactly the files the release layout needs (see "
                                       "engine/release_files.py) into DIR, each from its hub repository. Shows the "
                                       "total size first; resumable: a re-run skips complete files and continues "
                                       "a partial one. Environment: HF_ENDPOINT (hub or mirror address), HF_TOKEN "
                                       "(gated or private repositories), HF_HUB_OFFLINE=1 (download nothing; fail "
                                       "in one line when files are missing).")
    f.add_argument("dir", type=Path, metavar="DIR", help="weights directory (created if missing)")
    f.add_argument("--with-dwpose", action="store_true",
                   help="also fetch DWPose (yzd-v/DWPose: yolox_l.onnx, dw-ll_ucoco_384.onnx) for the initial pose "
                        "of the reference image; without it the engine fits a template pose")
    f.set_defaults(func=cmd_fetch)

    c = actions.add_parser("check", help="one line per component: present, size, intact, strict key check",
                           formatter_class=DefaultsHelpFormatter,
                           description="Check every component of the release layout in DIR with the loader the "
                                       "engine uses: missing files, git-lfs pointers, truncated or corrupt files and "
                                       "any missing, unexpected or mis-shaped key are named, one line per component. "
                                       "Exit status 0 when all are usable (DWPose may be absent), 1 otherwise.")
    c.add_argument("dir", type=Path, metavar="DIR", help="weights directory")
    c.add_argument("--preset", choices=sorted(PRESETS), default="mmgt",
                   help="the network sizes the weights must fit (the release is 'mmgt')")
    c.set_defaults(func=cmd_check)

    v = actions.add_parser("convert", help="write safetensors twins of the pickled checkpoints, once",
                           description="Convert the pickled checkpoints of DIR (audio2pose_best_model.pt, "
                                       "net-32500.pth, WavLM-Large.pt when present) to .safetensors files beside "
                                       "them, read back and compared key by key. The loaders then read the twins "
                                       "and never unpickle; a twin whose pickle changed later is ignored (with a "
                                       "warning) until converted again. The pickles are kept.")
    v.add_argument("dir", type=Path, metavar="DIR", help="weights directory")
    v.set_defaults(func=cmd_convert)
