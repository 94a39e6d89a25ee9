"""The objects that cross stage boundaries (DESIGN.md, "Data, as it flows").

audio source -> AudioChunk -> (scheduler: Window) -> Stage I -> PoseWindow -> Stage II -> FrameBatch -> FrameSink.
Everything here is numpy or duck-typed (no torch import) so sources, sinks and the streaming layer never import a
deep-learning stack; the device tensors a PoseWindow carries between the stages are typed by their role only.
The dataclasses are frozen; the arrays inside are the caller's and are not copied, so do not mutate them after
handing them on. ``eq=False`` because element-wise array equality has no single truth value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

FPS = 25  # mmgt.config.FPS
SAMPLE_RATE = 16_000  # mmgt.config.AUDIO_SAMPLE_RATE
N_KEYPOINTS = 134  # mmgt.config.N_KEYPOINTS


def _check_array(owner: str, name: str, a: object, dtype: type, ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{owner}.{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{owner}.{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{owner}.{name} must have {ndim} dimensions, got shape {a.shape}")
    return a


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """A run of float32 mono audio at 16 kHz, placed on the stream's sample clock."""

    samples: np.ndarray  # (N,) float32 in [-1, 1]
    start_sample: int  # stream sample index of samples[0]
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        _check_array("AudioChunk", "samples", self.samples, np.float32, 1)
        if self.start_sample < 0:
            raise ValueError(f"AudioChunk.start_sample must be >= 0, got {self.start_sample}")

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def end_sample(self) -> int:
        """Stream sample index after the last sample."""
        return self.start_sample + self.n_samples

    @property
    def duration(self) -> float:
        """Seconds of audio in this chunk."""
        return self.n_samples / self.sample_rate


@dataclass(frozen=True, eq=False)
class PoseWindow:
    """Stage I output for the frames one scheduler Window emits: poses, pose frames, masks and audio tokens.

    Only the emitted frames cross to Stage II (the window's seam already blended), so consecutive PoseWindows tile
    the frame clock without gaps or repeats.
    """

    index: int  # scheduler Window.index
    first_frame: int  # global frame of keypoints[0]
    n_frames: int  # F: frames emitted by this window
    keypoints: np.ndarray  # (F, 134, 3) float32 pixel keypoints on the 512 canvas
    pose_frames: np.ndarray  # (F, H, W, 3) uint8 RGB skeleton drawings at render resolution
    masks: Tuple[np.ndarray, ...] = ()  # per level the UNet reads: (F, 3, h*w) float32 in [0, 1], full/face/lip on
    # axis 1 (mmgt.motion_masks' one layout)
    audio_tokens: Any = None  # (F, T, D) MM-HAA audio tokens of these frames, a tensor on the model's device
    ready: Any = None  # GPU: a CUDA event on Stage I's stream after which audio_tokens exist (None on a CPU)
    before: Optional["PoseState"] = None  # Stage I's state before this window: where a resumed run restarts it

    def __post_init__(self) -> None:
        kp = _check_array("PoseWindow", "keypoints", self.keypoints, np.float32, 3)
        if kp.shape != (self.n_frames, N_KEYPOINTS, 3):
            raise ValueError(f"PoseWindow.keypoints must be ({self.n_frames}, {N_KEYPOINTS}, 3), got {kp.shape}")
        pf = _check_array("PoseWindow", "pose_frames", self.pose_frames, np.uint8, 4)
        if pf.shape[0] != self.n_frames or pf.shape[3] != 3:
            raise ValueError(f"PoseWindow.pose_frames must be ({self.n_frames}, H, W, 3), got {pf.shape}")
        for level, m in enumerate(self.masks):
            if not isinstance(m, np.ndarray) or not np.issubdtype(m.dtype, np.floating):
                raise TypeError(f"PoseWindow.masks[{level}] must be a float numpy array")
            if m.ndim != 3 or m.shape[0] != self.n_frames or m.shape[1] != 3:
                raise ValueError(f"PoseWindow.masks[{level}] must be ({self.n_frames}, 3, h*w), got {m.shape}")
        if self.audio_tokens is not None and self.audio_tokens.shape[0] != self.n_frames:
            raise ValueError(f"PoseWindow.audio_tokens must have {self.n_frames} frames, "
                             f"got {self.audio_tokens.shape}")

    @property
    def end_frame(self) -> int:
        return self.first_frame + self.n_frames


@dataclass(frozen=True, eq=False)
class FrameBatch:
    """Decoded video frames leaving Stage II, in order on the global frame clock."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    first_frame: int  # global frame index of frames[0]
    fps: int = FPS
    index: int = -1  # the render chunk the frames came from (its number; -1 when they did not come from one)
    resume: Optional["ResumePoint"] = None  # what a run needs to continue exactly after these frames (None: the
    # frames did not end a render chunk that has a successor)

    def __post_init__(self) -> None:
        f = _check_array("FrameBatch", "frames", self.frames, np.uint8, 4)
        if f.shape[3] != 3:
            raise ValueError(f"FrameBatch.frames must be (T, H, W, 3) RGB, got {f.shape}")
        if self.first_frame < 0:
            raise ValueError(f"FrameBatch.first_frame must be >= 0, got {self.first_frame}")

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def end_frame(self) -> int:
        """Global frame index after the last frame."""
        return self.first_frame + self.n_frames

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) of the frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    @property
    def timestamp(self) -> float:
        """Media time of the first frame in seconds."""
        return self.first_frame / self.fps


@dataclass(frozen=True, eq=False)
class PoseState:
    """Stage I's state before a pose window: the previous window's SMGA output, which conditions the window (its
    initial pose) and is blended into its seam. Together with the window's index (its noise) it decides the window's
    poses exactly."""

    window: int  # the window this is the state before
    prev_vec: Optional[np.ndarray] = None  # (W, 402) float32 SMGA output of window - 1 (None: window 0, pose-driven)
    prev_start: int = 0  # global frame of prev_vec[0]


@dataclass(frozen=True, eq=False)
class ResumePoint:
    """Where an offline run can continue exactly, between two render chunks (engine/resume.py saves it beside a
    render). Everything else a run needs is recomputed: the noise is drawn per global frame, the pose noise per
    window index, the audio tokens per window."""

    chunk: int  # the first render chunk still to render
    frame: int  # the first frame still to emit (= frames already emitted)
    pose: PoseState  # Stage I restarts at pose.window, the pose window that holds that chunk's first frame
    known: Any = None  # (1, 4, O, h, w) final latents of the chunk's overlap frames (a tensor; None: no overlap)

    def __post_init__(self) -> None:
        if self.chunk < 0 or self.frame < 0 or self.pose.window < 0:
            raise ValueError(f"ResumePoint: chunk, frame and window must be >= 0, got {self.chunk}, {self.frame}, "
                             f"{self.pose.window}")


class RenderedChunk(NamedTuple):
    """Stage II's output, what decode takes: the denoised chunk, and the point to continue from after its frames
    (None where the schedule keeps none: a rolling render resumes from its start)."""

    result: Any  # mmgt.pipeline.StageIIResult
    resume: Optional[ResumePoint] = None


@dataclass(frozen=True)
class RunMeta:
    """What a sink needs to know before the first frame: clocks, size, and what model made the frames."""

    fps: int  # frame clock
    width: int  # frame width in pixels
    height: int  # frame height in pixels
    audio_samples: int  # samples of the driving audio (0 for an open-ended live stream)
    sample_rate: int  # of the driving audio
    preset: str  # model preset name ("tiny", "mmgt", ...)
    trained: bool  # False: seeded random weights, the video is not a real avatar

    def __post_init__(self) -> None:
        for name in ("fps", "width", "height", "sample_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunMeta.{name} must be >= 1, got {getattr(self, name)}")
        if self.audio_samples < 0:
            raise ValueError(f"RunMeta.audio_samples must be >= 0, got {self.audio_samples}")

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height)."""
        return self.width, self.height

    @property
    def audio_duration(self) -> float:
        """Seconds of driving audio."""
        return self.audio_samples / self.sample_rate


@runtime_checkable
class FrameSink(Protocol):
    """Where frames go: an mp4 file, a WebRTC track's queue, or nowhere (benchmarks).

    ``open`` is called before any rendering (so a bad output path fails early), ``write`` with consecutive
    batches, ``close(ok)`` exactly once: ok=False discards what a file sink has written.
    """

    def open(self, meta: RunMeta) -> None: ...

    def write(self, batch: FrameBatch) -> None: ...

    def close(self, ok: bool) -> None: ...


__all__ = ["AudioChunk", "PoseWindow", "FrameBatch", "PoseState", "ResumePoint", "RenderedChunk", "RunMeta", "FrameSink", "FPS",
           "SAMPLE_RATE", "N_KEYPOINTS"]
