"""Shared fixtures: the tiny model set (built once per session), the bundled portrait and speech."""
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "engine" / "assets"
SHARED_KEYS = ROOT.parent / "shared" / "mmgt_keys"  # the release key lists, beside the checkout (as CI has them)
KEYS_COPY = ROOT / "tests" / "data" / "mmgt_keys"  # a copy of them, so a lone clone checks the same layouts


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    """The release key lists: ../shared/mmgt_keys where it is beside the checkout (the authority), else the copy in
    tests/data (test_key_list_copy_matches_shared keeps the two equal)."""
    return SHARED_KEYS if SHARED_KEYS.is_dir() else KEYS_COPY


@pytest.fixture(scope="session")
def release_keys(keys_dir):
    """``release_keys(json_name, prefix="")``: {key without prefix: shape tuple} of one release key list."""
    import json

    def load(name: str, prefix: str = "") -> dict:
        table = json.loads((keys_dir / name).read_text())
        return {k[len(prefix):]: tuple(v) for k, v in table.items() if k.startswith(prefix)}

    return load


@pytest.fixture(scope="session")
def tiny_models():
    import torch

    from mmgt.config import TINY
    from mmgt.pipeline import build_models

    torch.set_num_threads(1)  # the tiny preset's ops are too small to gain from threads (see engine --threads)
    return build_models(TINY)


@pytest.fixture(scope="session")
def portrait() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(ASSETS / "portrait.jpg").convert("RGB"))


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """12 s of espeak-ng speech, 16 kHz mono float32."""
    import importlib.util

    if importlib.util.find_spec("av") is None:  # GPU machines without PyAV: the asset is 16 kHz mono FLAC
        import soundfile

        data, rate = soundfile.read(ASSETS / "speech.flac", dtype="float32")
        assert rate == 16000 and data.ndim == 1
        return data
    from mmgt.audio_io import load_audio

    return load_audio(ASSETS / "speech.flac")


@pytest.fixture(scope="session")
def tiny_avatar(tiny_models, portrait):
    from mmgt.pipeline import prepare_avatar

    return prepare_avatar(tiny_models, portrait)


@pytest.fixture(scope="session")
def in_threads():
    """``in_threads(work, n)``: run ``work(i)`` for i < n in n threads at once; returns the exceptions they raised."""
    import threading

    def run(work, n: int) -> list:
        errors = []

        def guarded(i):
            try:
                work(i)
            except Exception as e:  # noqa: BLE001 - returned to the test, which asserts on it
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    return run


@pytest.fixture(scope="session")
def collecting_sink():
    """A NullSink that keeps what it gets: ``sink.out`` (the FrameBatches) and ``sink.video()`` (all frames)."""
    from engine.sinks import NullSink

    class CollectingSink(NullSink):
        def __init__(self):
            super().__init__()
            self.out = []

        def write(self, batch) -> None:
            super().write(batch)
            self.out.append(batch)

        def video(self) -> np.ndarray:
            return np.concatenate([b.frames for b in self.out])

    return CollectingSink


EXPORT_CHUNK = 4  # the chunk the shared tiny artifacts are exported for


def run_export_command(out, *extra: str):
    """`engine export --preset tiny --out OUT --chunk 4 EXTRA...` in-process: (exit code, stdout, stderr, seconds)."""
    import io
    import time

    from engine.models import ExportSource
    from export.cli import build_parser, run_export

    args = build_parser().parse_args(["export", "--preset", "tiny", "--out", str(out), "--chunk",
                                      str(EXPORT_CHUNK), *extra])
    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    rc = run_export(args, ExportSource.from_args(args), out=stdout, err=stderr)
    return rc, stdout.getvalue(), stderr.getvalue(), time.perf_counter() - start


@pytest.fixture(scope="session")
def tiny_exported(tmp_path_factory):
    """Every network of the tiny preset exported once for the session (onnx, fp32, chunk 4), then the same command
    again: (artifact directory, first run, second run), each run (exit code, stdout, stderr, seconds)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # faster exports; put back after: CPU sums depend on the count, later tests compare
    try:
        out = tmp_path_factory.mktemp("export") / "A"
        first = run_export_command(out)
        second = run_export_command(out)
    finally:
        torch.set_num_threads(threads)
    assert first[0] == 0, first[2]
    return out, first, second


@pytest.fixture(scope="session")
def write_media():
    """``write_media(path, data, rate, codec, container_format=None, video=False)``: encode float (channels, n)
    audio with PyAV (optionally beside a black mpeg4 video stream; ``data=None``: video only). Skips without PyAV."""
    av = pytest.importorskip("av")

    def write(path, data, rate, codec, container_format=None, video=False):
        with av.open(str(path), "w", format=container_format) as out:
            if video:
                vs = out.add_stream("mpeg4", rate=25)
                vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
            if data is not None:
                st = out.add_stream(codec, rate=rate, layout="stereo" if data.shape[0] == 2 else "mono")
                for i in range(0, data.shape[1], 1000):
                    fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, i:i + 1000], dtype=np.float32),
                                                    format="fltp", layout=st.layout.name)
                    fr.sample_rate, fr.pts = rate, i
                    for pk in st.encode(fr):
                        out.mux(pk)
                for pk in st.encode(None):
                    out.mux(pk)
            if video:
                for k in range(10):
                    vf = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                    vf.pts = k
                    for pk in vs.encode(vf):
                        out.mux(pk)
                for pk in vs.encode(None):
                    out.mux(pk)
        return path

    return write



@pytest.fixture(scope="session")
def write_wav():
    """``write_wav(path, data, rate)``: (C, n) float in [-1, 1] -> 16-bit PCM wav with the standard library (PyAV
    cannot build planar frames of 8 channels or more); returns the (C, n) float32 samples the file holds."""
    import wave

    def write(path, data, rate):
        pcm = np.round(np.clip(data, -1.0, 1.0) * 32767).astype("<i2")  # (C, n)
        with wave.open(str(path), "wb") as w:
            w.setnchannels(pcm.shape[0]), w.setsampwidth(2), w.setframerate(rate)
            w.writeframes(np.ascontiguousarray(pcm.T).tobytes())  # interleaved (n, C)
        return pcm.astype(np.float32) / 32768.0

    return write
