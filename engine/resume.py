"""Resumable renders: an mp4 written in segments, with what is needed to continue exactly kept beside it.

A render of ``talk.mp4`` writes its video in segments of about ``segment_frames`` frames into the sidecar folder
``.talk.mp4.resume/`` beside it; each finished segment is saved with the ``ResumePoint`` of the chunk boundary it
ends on (engine/types.py: Stage I's state before the next pose window, the overlap latents, the positions) and the
fingerprint of the command (inputs' contents, settings, model and where it runs). Re-running the same command finds
the sidecar, checks the fingerprint, and the runner continues from the last saved point (``Runner.run(...,
start=point)``): the frames equal those of an uninterrupted render (the noise is drawn per global frame, the pose
noise per window index). When the last frame is written the segments are joined without re-encoding (their packets
remuxed one after the other), the source's audio is muxed once over the joined video, the result is renamed over the
output, and the sidecar is removed. The output path is never half-written: until the rename it does not change.

    sidecar = Sidecar(out)
    saved = None if restart else sidecar.load(key)        # None: nothing to continue (or another command's)
    sink = ResumableMp4Sink(out, source, sidecar, key, saved)
    runner.run(audio, sink, start=saved.point if saved else None)

The state is one ``state.npz`` (JSON description + arrays), replaced atomically after each segment, so a process
killed at any moment (SIGKILL included) leaves a sidecar that continues from its last complete segment; stray
half-written segments are removed when it is next opened. Standard library at module level; numpy and PyAV are
imported inside the functions that need them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional

from engine.native_memory import release_freed_memory
from engine.settings import RenderSettings
from engine.types import FPS, SAMPLE_RATE, FrameBatch, PoseState, ResumePoint, RunMeta

log = logging.getLogger(__name__)

STATE_VERSION = 1  # of state.npz: another version is not continued from
SEGMENT_SECONDS = 10.0  # default segment length: at most this much rendering is redone after a kill
STATE_FILE = "state.npz"


# ----------------------------------------------------------------------------------------------------------------
# what decides the frames
# ----------------------------------------------------------------------------------------------------------------
def model_identity(options, models) -> Dict[str, Any]:
    """What of the model set and its flags changes frames: the flags (engine.models.ModelOptions) with paths made
    absolute, the device kind and compute dtype, and on a CPU the torch thread count (CPU sums depend on it)."""
    import torch

    ident = {k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    device = torch.device(models.device).type
    ident.update(preset=models.cfg.name, device=device, dtype=str(models.dtype),
                 threads=torch.get_num_threads() if device == "cpu" else None)
    return ident


def fingerprint(inputs: Dict[str, Optional[Path]], settings: RenderSettings, model: Dict[str, Any]) -> str:
    """sha256 of a command's inputs (their contents, by role), settings and model (``model_identity``): a sidecar is
    continued only by the command whose fingerprint it holds."""
    digests = {}
    for role, path in sorted(inputs.items()):
        if path is not None:
            with open(path, "rb") as f:
                digests[role] = hashlib.file_digest(f, "sha256").hexdigest()
    key = {"version": STATE_VERSION, "inputs": digests, "settings": asdict(settings), "model": model}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# the sidecar folder
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One finished piece of the video (H.264 only) in the sidecar."""

    file: str  # name inside the sidecar
    first: int  # global frame of its first frame
    frames: int  # frames it holds


@dataclass
class Saved:
    """What a sidecar holds: the finished segments and the point after the last one (after the last frame: only the
    join is left, which a run from that point does)."""

    segments: List[Segment] = field(default_factory=list)
    point: Optional[ResumePoint] = None
    comment: str = ""  # the mp4's comment metadata (which preset made it)

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.segments)


class Sidecar:
    """``.<name>.resume/`` beside the output ``out``: its segments and state."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out.parent / f".{self.out.name}.resume"

    def exists(self) -> bool:
        return self.dir.is_dir()

    def segment_path(self, index: int) -> Path:
        return self.dir / f"seg-{index:06d}.mp4"

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def load(self, key: str) -> Optional[Saved]:
        """The saved state when it belongs to the command of fingerprint ``key`` and its segments are all there;
        else None (the reason logged; the sidecar is then started over by the sink)."""
        import numpy as np

        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in data.files if k != "meta"}
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: unreadable state (%s); starting over", self.dir, e)
            return None
        if meta.get("version") != STATE_VERSION or meta.get("key") != key:
            log.warning("%s belongs to another render of %s (other inputs, settings or model); starting over",
                        self.dir, self.out.name)
            return None
        segments = [Segment(**s) for s in meta["segments"]]
        missing = [s.file for s in segments if not (self.dir / s.file).is_file()]
        if missing:
            log.warning("%s: segment(s) %s missing; starting over", self.dir, ", ".join(missing))
            return None
        p = meta["point"]
        point = ResumePoint(chunk=p["chunk"], frame=p["frame"], known=arrays.get("known"),
                            pose=PoseState(p["window"], arrays.get("prev_vec"), p["prev_start"]))
        saved = Saved(segments=segments, point=point, comment=meta.get("comment", ""))
        if point.frame != saved.frames:
            log.warning("%s: state at frame %d but the segments hold %d frames; starting over", self.dir, point.frame,
                        saved.frames)
            return None
        return saved

    def save(self, key: str, saved: Saved) -> None:
        """Replace the state atomically (a kill leaves the previous state or this one)."""
        import numpy as np

        pt, arrays = saved.point, {}
        if pt.pose.prev_vec is not None:
            arrays["prev_vec"] = np.asarray(pt.pose.prev_vec, np.float32)  # (W, 402)
        if pt.known is not None:  # (1, 4, O, h, w): fp16 / bf16 latents are exact in float32; the runner casts back
            arrays["known"] = pt.known.detach().float().cpu().numpy()
        point = {"chunk": pt.chunk, "frame": pt.frame, "window": pt.pose.window, "prev_start": pt.pose.prev_start}
        meta = {"version": STATE_VERSION, "key": key, "segments": [asdict(s) for s in saved.segments],
                "comment": saved.comment, "point": point}
        tmp = self.dir / f".{STATE_FILE}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / STATE_FILE)

    def tidy(self, saved: Optional[Saved]) -> None:
        """Remove what the state does not list (half-written segments of a killed run, an old state's leftovers)."""
        keep = {STATE_FILE} | {s.file for s in (saved.segments if saved else ())}
        for p in self.dir.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------------------------------------------
# the sink
# ----------------------------------------------------------------------------------------------------------------
class ResumableMp4Sink:
    """A FrameSink that writes ``path`` as segments in its sidecar, saves a resume point after each, and joins them
    with the source's audio into ``path`` on ``close(ok=True)``. ``saved``: what an earlier run of the same command
    (fingerprint ``key``) left; the frames then start at ``saved.frames``. ``close(ok=False)`` keeps the finished
    segments (the run can be continued) and drops the unfinished one."""

    def __init__(self, path: str | os.PathLike, audio, sidecar: Sidecar, key: str, saved: Optional[Saved] = None,
                 segment_frames: int = round(SEGMENT_SECONDS * FPS), audio_bitrate: Optional[int] = None,
                 fps: int = FPS) -> None:
        if segment_frames < 1:
            raise ValueError(f"ResumableMp4Sink({path}): segment_frames must be >= 1, got {segment_frames}")
        self.path, self.audio, self.sidecar, self.key = Path(path), audio, sidecar, key
        self.saved = saved or Saved()
        self.segment_frames, self.audio_bitrate, self.fps = segment_frames, audio_bitrate, fps
        self.frames_written = 0  # this run's frames
        self._meta: Optional[RunMeta] = None
        self._segment = None  # the Mp4Sink of the segment being written
        self._segment_first = 0
        self._point: Optional[ResumePoint] = None  # the resume point of the newest frames written

    @property
    def frames(self) -> int:
        """Frames in finished segments (saved, resumable)."""
        return self.saved.frames

    def open(self, meta: RunMeta) -> None:
        from engine.sinks import SinkError, video_comment

        out_dir = self.path.resolve().parent
        if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
            raise SinkError(f"cannot write video to {self.path}: output directory {out_dir} is missing or read-only")
        if self.saved.segments:
            self.sidecar.tidy(self.saved)
        else:
            self.sidecar.clear()
            self.sidecar.dir.mkdir()
        self._meta = meta
        self.saved.comment = video_comment(meta)

    def write(self, batch: FrameBatch) -> None:
        from engine.sinks import Mp4Sink

        if self._meta is None:
            raise RuntimeError(f"ResumableMp4Sink({self.path}): write() before open()")
        if self._segment is None:  # a new segment starts with this batch
            expect = self.frames
            if batch.first_frame != expect:
                raise ValueError(f"ResumableMp4Sink({self.path}): frames must continue at frame {expect}, got "
                                 f"{batch.first_frame}")
            self._segment = Mp4Sink(self.sidecar.segment_path(len(self.saved.segments)), None, fps=self.fps,
                                    log_level=logging.DEBUG)
            self._segment.open(self._meta)
            self._segment_first = batch.first_frame
        self._segment.write(dataclasses.replace(batch, first_frame=batch.first_frame - self._segment_first))
        self.frames_written += batch.n_frames
        self._point = batch.resume
        if self._point is not None and self._segment.frames_written >= self.segment_frames:
            self._finish_segment()

    def _finish_segment(self) -> None:
        """Close the segment being written (renamed into the sidecar), then save the state that lists it."""
        if self._point is None:
            raise RuntimeError(f"ResumableMp4Sink({self.path}): the frames came without a resume point")
        seg, self._segment = self._segment, None
        seg.close(ok=True)
        release_freed_memory()  # the segment's encoder buffers go back to the system: hours stay flat
        self.saved.segments.append(Segment(Path(seg.path).name, self._segment_first, seg.frames_written))
        self.saved.point = self._point
        self.sidecar.save(self.key, self.saved)
        log.debug("%s: segment %d saved (frames %d-%d)", self.sidecar.dir, len(self.saved.segments) - 1,
                  self._segment_first, self.frames - 1)

    def close(self, ok: bool) -> None:
        if not ok:
            if self._segment is not None:
                self._segment.close(ok=False)  # its temp file goes; the finished segments stay
                self._segment = None
            if not self.saved.segments:
                self.sidecar.clear()
            return
        if self._segment is not None:
            self._finish_segment()  # saved too: interrupted while joining, a re-run only joins
        self.join()

    def join(self) -> None:
        """The finished segments + the source's audio -> ``path`` (atomically), then the sidecar is removed."""
        if not self.saved.segments:
            from engine.sinks import SinkError

            raise SinkError(f"no frames were written to {self.path}; not saving an empty video")
        join_segments([self.sidecar.dir / s.file for s in self.saved.segments], self.path, self.audio,
                      self.audio_bitrate, self.fps, self.saved.comment)
        self.sidecar.clear()
        log.info("%s: %d frames in %d segments joined", self.path, self.frames, len(self.saved.segments))

    def resume_hint(self) -> Optional[str]:
        """How to continue after an interruption (None when nothing was kept)."""
        if not self.saved.segments:
            return None
        return (f"the first {self.frames} frames are kept in {self.sidecar.dir}: run the same command again to "
                f"continue from frame {self.frames} (--restart starts over)")


def join_segments(segments: List[Path], out: Path, audio, audio_bitrate: Optional[int], fps: int = FPS,
                  comment: str = "") -> None:
    """Remux the H.264 packets of ``segments`` (same encoder settings, each starting with a keyframe) one after the
    other into ``out``, with ``audio`` (a SourceAudio: copied or AAC, cut to the video) interleaved. Written to a temp
    file beside ``out`` and renamed over it when complete; nothing is left on failure or interruption."""
    import av

    from engine.source_audio import open_track

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.resolve().parent)
    track = None
    try:
        os.close(fd)
        with av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            container.metadata["comment"] = comment
            video, track, frames = None, None, 0
            for path in segments:
                with av.open(str(path)) as seg:
                    src = seg.streams.video[0]
                    if video is None:
                        video = container.add_stream_from_template(src)
                        extradata = src.codec_context.extradata
                        track = open_track(container, audio, SAMPLE_RATE, audio_bitrate)
                    elif src.codec_context.extradata != extradata:
                        raise RuntimeError(f"{path.name} was encoded with other parameters than the first segment")
                    shift = Fraction(frames, fps) / src.time_base  # this segment's start, in its time base
                    if shift.denominator != 1:
                        raise RuntimeError(f"{path.name}: time base {src.time_base} does not hold whole frames")
                    n = 0
                    for packet in seg.demux(src):
                        if packet.dts is None:  # the demuxer's flush packet
                            continue
                        packet.pts, packet.dts = packet.pts + int(shift), packet.dts + int(shift)
                        packet.stream = video
                        container.mux(packet)
                        n += 1
                        track.until(packet.pts * src.time_base)  # the audio up to here, interleaved
                    frames += n
            track.finish(Fraction(frames, fps))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; a finished video gets normal modes
        os.replace(tmp, out)
    except BaseException:
        if track is not None:
            track.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


__all__ = ["STATE_VERSION", "SEGMENT_SECONDS", "model_identity", "fingerprint", "Segment", "Saved", "Sidecar",
           "ResumableMp4Sink", "join_segments"]
