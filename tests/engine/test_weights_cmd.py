"""`engine weights fetch / check / convert` and `engine doctor`, against a fake hub on 127.0.0.1.

The fake hub is an aiohttp server in the test process that speaks the resolve endpoint huggingface_hub uses (HEAD and
GET with ETag, X-Repo-Commit, Content-Length and byte ranges) and serves a tiny model set saved in the release layout,
each file under the repository the table of engine/release_files.py names. fetch runs as a subprocess with
HF_ENDPOINT pointing at it, so nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from engine.cli import main
from engine.release_files import COMPONENTS, MMGT_REPO, STATE_DIR, needed_files

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--hop", "40", "--chunk", "12", "--overlap", "4", "-q"]
TOKEN = "hf_fake_token_for_the_test_hub"
NET = "stage_2/process_2/net-32500.pth"
NET_LOCAL = f"MMGT_pretrained/{NET}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The fake hub
# ----------------------------------------------------------------------------------------------------------------
class FakeHub:
    """The resolve endpoint of a Hugging Face hub for ``repos`` ({repo id: {path in repo: local file}}), counting
    the body bytes it sends per (repo, path) and recording every request."""

    def __init__(self, repos):
        self.repos = repos
        self.served = collections.Counter()  # (repo, path) -> body bytes sent
        self.requests = []  # (method, repo, path, Range header, Authorization header)
        self.stall_after = {}  # (repo, path) -> send this many bytes, then hang until the client goes away
        self.corrupt = set()  # (repo, path) whose body has one byte flipped (its ETag stays that of the file)
        self.stalled = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_counts(self):
        self.served.clear()
        self.requests.clear()

    def _serve(self):
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()

    @staticmethod
    def _etag(path: Path, data: bytes) -> str:
        """As the hub: sha256 for LFS files (weights), the git blob sha1 for small text files."""
        if path.suffix == ".json":
            return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        return hashlib.sha256(data).hexdigest()

    async def _handle(self, request):
        from aiohttp import web

        tail = request.match_info["tail"]
        if "/resolve/" not in tail:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        repo, rest = tail.split("/resolve/", 1)
        revision, path = rest.split("/", 1)
        self.requests.append((request.method, repo, path, request.headers.get("Range"),
                              request.headers.get("Authorization")))
        commit = hashlib.sha1(repo.encode()).hexdigest()
        if repo not in self.repos:
            return web.Response(status=401, headers={"X-Error-Code": "RepoNotFound"})
        if revision != "main":
            return web.Response(status=404, headers={"X-Error-Code": "RevisionNotFound"})
        if path not in self.repos[repo]:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        src = self.repos[repo][path]
        data = src.read_bytes()
        start = 0
        if request.headers.get("Range", "").startswith("bytes="):
            start = int(request.headers["Range"][len("bytes="):].split("-")[0])
        headers = {"ETag": f'"{self._etag(src, data)}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        limit = self.stall_after.get((repo, path), len(data))
        if (repo, path) in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        pos = start
        while pos < len(data):
            if pos >= limit:  # the connection hangs mid-file, as a fetch killed (or cut off) midway sees it
                self.stalled.set()
                while request.transport is not None and not request.transport.is_closing():
                    await asyncio.sleep(0.05)
                return resp
            chunk = data[pos:min(pos + 65536, limit)]
            await resp.write(chunk)
            pos += len(chunk)
            self.served[(repo, path)] += len(chunk)
        await resp.write_eof()
        return resp


def _repos(src: Path):
    """The files of a saved layout under the repositories and paths of the table."""
    repos = collections.defaultdict(dict)
    for comp in COMPONENTS:
        for alternatives in comp.files:
            for repo_path in alternatives:
                if comp.local(src, repo_path).is_file():
                    repos[comp.repo][repo_path] = comp.local(src, repo_path)
    return dict(repos)


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def release_src(tmp_path_factory, tiny_models):
    """The tiny model set in the release layout, plus two stand-in DWPose ONNX files."""
    from mmgt.pipeline import save_models

    src = tmp_path_factory.mktemp("hub_files")
    save_models(tiny_models, src)
    (src / "DWPose").mkdir()
    for name in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"):
        _tiny_onnx(src / "DWPose" / name)
    return src


@pytest.fixture(scope="module")
def hub(release_src):
    with FakeHub(_repos(release_src)) as h:
        yield h


def _env(hub, tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp / "hf_home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _fetch(hub, tmp: Path, target: Path, *flags, **env):
    return subprocess.run([sys.executable, "-m", "engine", "weights", "fetch", str(target), *flags], cwd=tmp,
                          env=_env(hub, tmp, **env), capture_output=True, text=True, timeout=300)


def _expected_files(release_src: Path):
    """{local path: source file} of what a fetch without --with-dwpose must write."""
    out = {}
    for comp in COMPONENTS:
        for alternatives in comp.files if not comp.optional else ():
            have = comp.present(release_src, alternatives)
            out[comp.local(Path(), have).as_posix()] = comp.local(release_src, have)
    return out


@pytest.fixture(scope="module")
def fetched(hub, release_src, tmp_path_factory):
    """One complete fetch (without DWPose), reused (copied) by the tests that start from a fetched layout."""
    tmp = tmp_path_factory.mktemp("fetched")
    hub.reset_counts()
    out = _fetch(hub, tmp, tmp / "weights")
    assert out.returncode == 0, out.stderr
    return tmp / "weights", out, dict(hub.served), list(hub.requests)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)  # copy2 keeps mtimes (twins compare them)
    return dst


def _check(capsys, root: Path, preset="tiny"):
    rc = main(["weights", "check", str(root), "--preset", preset])
    lines = capsys.readouterr().out.strip().splitlines()
    return rc, {line.split(":", 1)[0]: line for line in lines[:-1]}, lines[-1]


# ----------------------------------------------------------------------------------------------------------------
# fetch -> check -> render
# ----------------------------------------------------------------------------------------------------------------
def test_fetch_downloads_exactly_the_layout_with_token_and_total_first(fetched, release_src):
    root, out, served, requests = fetched
    wanted = _expected_files(release_src)
    # every file of the layout, byte for byte, each sent once; DWPose not asked for
    for rel, src in wanted.items():
        assert _sha256(root / rel) == _sha256(src), rel
    assert sum(served.values()) == sum(src.stat().st_size for src in wanted.values())
    assert not any(repo == "yzd-v/DWPose" for _, repo, *_ in requests)
    got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                 and not p.relative_to(root).as_posix().startswith(".cache/"))
    assert got == sorted(wanted)
    assert all(auth == f"Bearer {TOKEN}" for *_, auth in requests)  # HF_TOKEN goes with every request
    # the total size is said before any download, then the one-line result
    assert f"{len(wanted)} files from 6 repositories" in out.stderr
    assert out.stdout.strip().startswith(f"fetched {len(wanted)} of {len(wanted)} files")
    assert not (root / STATE_DIR / "partial").exists() or not any((root / STATE_DIR / "partial").rglob("*.part"))


def test_rerun_skips_complete_files(fetched, hub, tmp_path):
    root = _copy(fetched[0], tmp_path / "w")
    hub.reset_counts()
    out = _fetch(hub, tmp_path, root)
    assert out.returncode == 0, out.stderr
    assert sum(hub.served.values()) == 0 and all(m == "HEAD" for m, *_ in hub.requests)
    assert out.stdout.startswith("fetched 0 of ")


def test_check_then_render_from_the_fetched_directory(fetched, tmp_path, capsys, speech):
    root = fetched[0]
    rc, lines, summary = _check(capsys, root)
    assert rc == 0, lines
    assert sorted(lines) == sorted(c.name for c in COMPONENTS)
    for comp in COMPONENTS:
        expect = "absent" if comp.optional else "ok"
        assert lines[comp.name].startswith(f"{comp.name}: {expect} "), lines[comp.name]
    assert "keys match the tiny networks" in lines["smga"] and "keys match the tiny networks" in lines["net"]
    assert summary.startswith(f"{len(COMPONENTS)} of {len(COMPONENTS)} components usable")

    # render with the fetched weights at the tiny sizes: the frames are those of the tiny preset it was saved from
    wav = tmp_path / "s.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(speech[:16000], -1, 1) * 32767).astype("<i2").tobytes())
    image = str(ROOT / "engine/assets/portrait.jpg")
    videos = []
    for name, flags in (("weights", ["--weights", str(root), "--preset", "tiny"]), ("built", ["--preset", "tiny"])):
        out = tmp_path / f"{name}.mp4"
        assert main(["render", "--image", image, "--audio", str(wav), "--out", str(out), *FAST, *flags]) == 0
        with av.open(str(out)) as c:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
    assert len(videos[0]) == 25
    np.testing.assert_array_equal(videos[0], videos[1])


def test_killed_fetch_resumes_with_only_the_missing_bytes(hub, release_src, tmp_path):
    root = tmp_path / "w"
    net_size = (release_src / NET_LOCAL).stat().st_size
    hub.reset_counts()
    hub.stalled.clear()
    # huggingface_hub writes what it receives in chunks of up to 10 MiB: hang past the first one, so part of the
    # file is on disk when the fetch dies (what arrived after it is lost with the process, as in a real kill)
    hub.stall_after[(MMGT_REPO, NET)] = net_size - (1 << 20)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "weights", "fetch", str(root), "-q"], cwd=tmp_path,
                                env=_env(hub, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert hub.stalled.wait(120), proc.communicate(timeout=5)
        parts = lambda: list((root / STATE_DIR / "partial").rglob("net-32500.pth.*.part"))  # noqa: E731
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (parts() and parts()[0].stat().st_size > 0):
            time.sleep(0.05)
        proc.kill()  # SIGKILL: nothing of the fetch gets to clean up
        proc.communicate(timeout=30)
    finally:
        hub.stall_after.clear()
    first_run = dict(hub.served)
    [part] = parts()
    have = part.stat().st_size
    assert 0 < have <= first_run[(MMGT_REPO, NET)] < net_size
    assert not (root / NET_LOCAL).exists()  # nothing half-written at the real path
    assert (root / "MMGT_pretrained/stage_1/audio2pose_best_model.pt").is_file()  # fetched before the kill

    hub.reset_counts()
    out = _fetch(hub, tmp_path, root)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr
    # the partial file is continued from its last byte, the complete one is not asked for again
    net_gets = [r for r in hub.requests if r[0] == "GET" and r[2] == NET]
    assert [r[3] for r in net_gets] == [f"bytes={have}-"]
    assert hub.served[(MMGT_REPO, NET)] == net_size - have
    assert (MMGT_REPO, "stage_1/audio2pose_best_model.pt") not in hub.served
    assert _sha256(root / NET_LOCAL) == _sha256(release_src / NET_LOCAL)
    assert not part.exists()


def test_with_dwpose_fetches_only_dwpose_onto_a_complete_layout(fetched, hub, tmp_path, capsys):
    root = _copy(fetched[0], tmp_path / "w")
    hub.reset_counts()
    out = _fetch(hub, tmp_path, root, "--with-dwpose")
    assert out.returncode == 0, out.stderr
    assert {path for (repo, path) in hub.served} == {"yolox_l.onnx", "dw-ll_ucoco_384.onnx"}
    rc, lines, _ = _check(capsys, root)
    assert rc == 0 and lines["dwpose"].startswith("dwpose: ok DWPose/ (2 files"), lines["dwpose"]


# ----------------------------------------------------------------------------------------------------------------
# offline mode and errors
# ----------------------------------------------------------------------------------------------------------------
def test_offline_mode_uses_the_disk_and_names_what_is_missing(fetched, hub, tmp_path):
    hub.reset_counts()
    out = _fetch(hub, tmp_path, tmp_path / "empty", HF_HUB_OFFLINE="1")
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("engine weights fetch: error: HF_HUB_OFFLINE is set and ")
    assert NET_LOCAL in line and "sd-vae-ft-mse/config.json" in line
    out = _fetch(hub, tmp_path, fetched[0], HF_HUB_OFFLINE="1")
    assert out.returncode == 0 and out.stdout.startswith("offline: all "), out.stderr
    assert hub.requests == []  # offline: the hub is not asked


def test_unknown_repository_and_unreachable_hub_are_one_line(hub, tmp_path):
    import engine.release_files as RF

    # a table whose first repository the hub does not have: patched into the child through sitecustomize
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import dataclasses, engine.release_files as RF\n"
        "RF.COMPONENTS = (dataclasses.replace(RF.COMPONENTS[0], repo='nobody/nothing'),) + RF.COMPONENTS[1:]\n")
    env = _env(hub, tmp_path)
    env["PYTHONPATH"] = f"{tmp_path / 'site'}{os.pathsep}{ROOT}"
    out = subprocess.run([sys.executable, "-m", "engine", "weights", "fetch", str(tmp_path / "w")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("engine weights fetch: error: nobody/nothing: repository not "
                                                   "found or not accessible (a private one needs HF_TOKEN)")
    assert RF.COMPONENTS[0].repo == MMGT_REPO  # this process's table is untouched

    env = _env(hub, tmp_path)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: nothing listens
    out = subprocess.run([sys.executable, "-m", "engine", "weights", "fetch", str(tmp_path / "w3")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("engine weights fetch: error: cannot reach http://127.0.0.1:9 ")


def test_bytes_that_do_not_match_the_checksum_are_not_kept(hub, release_src, tmp_path):
    hub.corrupt.add((MMGT_REPO, NET))
    try:
        out = _fetch(hub, tmp_path, tmp_path / "w")
    finally:
        hub.corrupt.clear()
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"engine weights fetch: error: {NET_LOCAL}: the downloaded bytes do not match the hub's checksum "
        f"{_sha256(release_src / NET_LOCAL)} ({MMGT_REPO}/{NET}); run fetch again to download it anew")
    assert not (tmp_path / "w" / NET_LOCAL).exists()
    assert not list((tmp_path / "w" / STATE_DIR / "partial").rglob("*.part"))


# ----------------------------------------------------------------------------------------------------------------
# check: broken layouts
# ----------------------------------------------------------------------------------------------------------------
def test_check_names_each_broken_file_and_exits_1(fetched, tmp_path, capsys):
    root = _copy(fetched[0], tmp_path / "w")
    (root / NET_LOCAL).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                  + "0" * 64 + "\nsize 17544277\n")
    vae = root / "sd-vae-ft-mse/diffusion_pytorch_model.safetensors"
    full = vae.stat().st_size
    vae.write_bytes(vae.read_bytes()[: full // 2])
    (root / "wav2vec/wav2vec2-base-960h/model.safetensors").unlink()
    rc, lines, summary = _check(capsys, root)
    assert rc == 1
    assert lines["net"].startswith(f"net: FAILED {NET_LOCAL}: a git-lfs pointer (")
    assert lines["vae"] == (f"vae: FAILED sd-vae-ft-mse/diffusion_pytorch_model.safetensors: truncated: {full // 2} "
                            f"of {full} bytes")
    assert lines["wav2vec2"].startswith("wav2vec2: FAILED wav2vec/wav2vec2-base-960h/model.safetensors: missing")
    assert [n for n, line in lines.items() if "FAILED" in line] == ["net", "vae", "wav2vec2"]
    assert summary.endswith("unusable: net, vae, wav2vec2")


def test_check_without_a_fetch_record_still_finds_truncation(release_src, tmp_path, capsys):
    """A layout made by hand (no fetch record): truncation shows in the file formats themselves."""
    root = _copy(release_src, tmp_path / "w")
    for rel in ("MMGT_pretrained/stage_1/audio2pose_best_model.pt", "stable-diffusion-v1-5/unet/config.json",
                "WavLM-Large/model.safetensors"):
        (root / rel).write_bytes((root / rel).read_bytes()[:-40])
    rc, lines, _ = _check(capsys, root)
    assert rc == 1
    assert lines["smga"].startswith("smga: FAILED MMGT_pretrained/stage_1/audio2pose_best_model.pt: not a complete "
                                    "torch checkpoint")
    assert lines["unet_config"].startswith("unet_config: FAILED stable-diffusion-v1-5/unet/config.json: not valid JSON")
    assert lines["wavlm"].startswith("wavlm: FAILED WavLM-Large/model.safetensors: not a complete safetensors file")
    assert lines["dwpose"].startswith("dwpose: ok ")


def test_check_is_strict_about_the_network_sizes(fetched, capsys):
    """The tiny layout checked against the release sizes: the key check names the mismatch, not a crash."""
    rc, lines, _ = _check(capsys, fetched[0], preset="mmgt")
    assert rc == 1
    for name in ("smga", "net"):
        assert f"does not match the mmgt networks: {name}: missing=" in lines[name], lines[name]
    assert "UNet config differs from the mmgt preset" in lines["unet_config"]
    assert "model does not match its config" in lines["wav2vec2"]


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------
def test_convert_writes_twins_that_loads_read_without_unpickling(fetched, tmp_path, capsys, monkeypatch, tiny_models):
    from mmgt import pipeline as P
    from mmgt.config import TINY
    from mmgt.weights import ReleaseLayout

    root = _copy(fetched[0], tmp_path / "w")
    pickles = {"smga": root / "MMGT_pretrained/stage_1/audio2pose_best_model.pt", "net": root / NET_LOCAL}
    before = {k: p.read_bytes() for k, p in pickles.items()}
    assert main(["weights", "convert", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("smga: wrote MMGT_pretrained/stage_1/audio2pose_best_model.safetensors (")
    assert out[1].startswith(f"net: wrote {NET_LOCAL[:-4]}.safetensors (")
    assert out[2] == "wavlm: WavLM-Large.pt not present; nothing to convert"
    assert {k: p.read_bytes() for k, p in pickles.items()} == before  # the pickles stay as they were
    layout = ReleaseLayout(root)
    assert layout.smga.suffix == layout.net.suffix == ".safetensors"

    # 1. a load reads the twins: torch.load (the unpickler) is never called, and the weights are the same
    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    models = P.load_models(root, TINY)
    for name, module in models.stage2_modules().items():
        ref = tiny_models.stage2_modules()[name].state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in module.state_dict().items()), name
    assert all(torch.equal(v, tiny_models.smga.state_dict()[k]) for k, v in models.smga.state_dict().items())
    rc, lines, _ = _check(capsys, root)
    assert rc == 0 and "(read from its safetensors twin audio2pose_best_model.safetensors)" in lines["smga"]
    assert "(read from its safetensors twin net-32500.safetensors)" in lines["net"]
    monkeypatch.undo()

    # 2. a second convert has nothing to do; a changed pickle makes its twin stale until converted again
    assert main(["weights", "convert", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "smga: MMGT_pretrained/stage_1/audio2pose_best_model.safetensors is up to date",
        f"net: {NET_LOCAL[:-4]}.safetensors is up to date"]
    os.utime(pickles["smga"], ns=(time.time_ns(), time.time_ns()))
    assert ReleaseLayout(root).smga == pickles["smga"]
    assert main(["weights", "convert", str(root)]) == 0
    assert capsys.readouterr().out.startswith("smga: wrote ")
    assert ReleaseLayout(root).smga.suffix == ".safetensors"


# ----------------------------------------------------------------------------------------------------------------
# the table, the parser, doctor
# ----------------------------------------------------------------------------------------------------------------
def test_table_is_the_layout_the_loaders_read(tmp_path):
    from engine.weights_cmd import STRICT_CHECKS
    from mmgt.init_pose import DET_FILE, POSE_FILE
    from mmgt.weights import ReleaseLayout

    layout = ReleaseLayout(tmp_path)
    paths = {c.name: [c.local(tmp_path, alts[0]) for alts in c.files] for c in COMPONENTS}
    assert paths["smga"] == [layout.smga] and paths["net"] == [layout.net]
    assert paths["unet_config"] == [layout.unet_config]
    (tmp_path / "WavLM-Large").mkdir()
    for name, folder in (("vae", layout.vae), ("image_encoder", layout.image_encoder),
                         ("wav2vec2", layout.wav2vec2), ("wavlm", layout.wavlm)):
        assert all(p.parent == folder for p in paths[name]), name
        assert paths[name][0].name == "config.json"
    assert paths["dwpose"] == [tmp_path / DET_FILE, tmp_path / POSE_FILE]
    assert set(STRICT_CHECKS) == {c.name for c in COMPONENTS}
    # a unilm WavLM-Large.pt put there by hand stands in for the transformers directory: not fetched, checked instead
    assert "wavlm" in {c.name for c, _ in needed_files(tmp_path, COMPONENTS)}
    (tmp_path / "WavLM-Large.pt").write_bytes(b"")
    assert "wavlm" not in {c.name for c, _ in needed_files(tmp_path, COMPONENTS)}
    assert layout.wavlm == tmp_path / "WavLM-Large.pt"
    for comp in COMPONENTS:  # safetensors before pickles wherever a repository has both
        for alts in comp.files:
            kinds = [Path(a).suffix == ".safetensors" for a in alts]
            assert kinds == sorted(kinds, reverse=True), alts


def test_doctor_lists_the_machine_and_exits_0(fetched, capsys):
    assert main(["doctor", "--weights", str(fetched[0]), "--preset", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    found = {line.split()[0]: line.split(None, 2)[1:] for line in lines[:-1]}  # name -> [state:, detail]
    assert list(found)[:10] == ["python", "torch", "cuda-gpu", "tensorrt", "onnxruntime", "pyav", "espeak-ng",
                                "virtual-camera", "sounddevice", "aiortc"]
    for name, (state, detail) in found.items():
        assert state in ("ok:", "missing:"), (name, state)
        if state == "missing:":
            assert " -> " in detail, (name, detail)  # how to get it
    assert found["torch"] == ["ok:", torch.__version__ + ", CPU-only build"] or torch.version.cuda
    assert "CPUExecutionProvider" in found["onnxruntime"][1]
    assert all(found[f"weights/{c.name}"][0] == "ok:" for c in COMPONENTS if not c.optional)
    assert lines[-1].startswith("the engine runs here")


def test_doctor_names_missing_pieces_and_fails_only_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "aiortc", None)  # an import of it now fails
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    [aiortc] = [line for line in out.splitlines() if line.startswith("aiortc")]
    assert "missing" in aiortc and "-> pip install 'mmgt-engine[serve]'" in aiortc
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("torch") and "MISSING (required)" in line and "pip install torch" in line
               for line in out)
    assert out[-1] == "the engine cannot run: torch"


def test_fetch_record_is_json_of_every_file(fetched, release_src):
    record = json.loads((fetched[0] / STATE_DIR / "fetched.json").read_text())
    assert record[NET_LOCAL]["size"] == (release_src / NET_LOCAL).stat().st_size
    assert record[NET_LOCAL]["etag"] == _sha256(release_src / NET_LOCAL)
    assert record[NET_LOCAL]["repo"] == MMGT_REPO and len(record[NET_LOCAL]["commit"]) == 40
