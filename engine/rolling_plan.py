"""The rolling schedule's plan (``--schedule rolling``): which frames sit in each denoiser call, at which step.

Pure like engine/scheduler.py: ints in, dataclasses out, no torch.

With S denoising steps, one denoiser call holds S groups of G frames (N = S * G <= 32 frames: the call's static
shape, which is the settings' ``chunk``). Group q covers the global frames [q*G, q*G + G). Call k holds the groups
k-S+1 .. k in frame order, group k-S+1+g at step index S-1-g: the oldest group takes its last step (it lands on x0
and leaves: the call emits it), the newest enters as pure noise (step 0). So every group gets the steps 0 .. S-1 in
S consecutive calls, in order, each once; nothing is denoised twice (PersonaLive's stream batch, Live2Diff and
FIFO-Diffusion work this way). The chunk schedule with chunk C and overlap O denoises C frames S times for C - O new
ones instead.

* Warm-up: the first S-1 calls have slots for groups before the stream (q < 0). They are filled, not cut off: the
  call keeps its one static shape (exported, compiled and CUDA-graphed denoisers have exactly one), and the first
  frames are denoised beside the frames they follow in the stream at its start, the avatar's reference image (each
  warm-up slot holds the reference latent re-noised to the slot's timestep, as overlap frames are in the chunk
  schedule, with frame 0's conditions). Warm-up slots are never emitted. A variable-length first call would need a
  second shape per network and would give the first frames no temporal context.
* Flush: at the end of a stream S-1 more calls take in tail groups (past the last frame: the last frame's conditions
  and their own noise, never emitted) until the last real group has had its S steps. The last real group may be
  partial (``valid`` < G), as the chunk schedule's last chunk is padded.
* Latency: a frame of group q leaves with call q+S-1, which needs the poses of group q+S-1, so a frame waits for
  N - G + 1 .. N frames beyond itself (chunk C, overlap O: 1 .. C - O); every call emits G frames: no bursts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from .scheduler import MAX_CHUNK_FRAMES, StreamChunkPlanner, _at_least

SCHEDULES = ("chunk", "rolling")  # Stage II schedules (RenderSettings.schedule)


def group_size(chunk: int, steps: int) -> int:
    """Frames per group G of a rolling call of ``chunk`` frames with ``steps`` noise levels (chunk = steps * G)."""
    c, s = _at_least("chunk", chunk, 1), _at_least("steps", steps, 1)
    if c % s:
        raise ValueError(f"--schedule rolling: --chunk {c} must be a multiple of --steps {s} (a denoiser call holds "
                         f"one group of chunk / steps frames per step)")
    return c // s


def _check_rolling_args(steps: object, group: object, max_frames: object) -> Tuple[int, int]:
    s, g, m = _at_least("steps", steps, 1), _at_least("group", group, 1), _at_least("max_frames", max_frames, 1)
    if s * g > m:
        raise ValueError(f"steps * group must be <= {m} frames (motion-module position table), got {s} * {g}")
    return s, g


@dataclass(frozen=True)
class RollingGroup:
    """One group of G frames in a rolling call. Frame numbers are global."""

    index: int  # q: frames [q*G, q*G + G); negative: a warm-up slot before the stream
    start: int  # global frame of the group's first frame (q * G)
    step: int  # DDIM step index this call applies (0: entered as pure noise; S-1: lands on x0 and leaves)
    valid: int  # real stream frames in the group: G, fewer in the last group, 0 in warm-up and tail slots

    @property
    def warmup(self) -> bool:
        """A slot before the stream (the reference latent re-noised, never emitted)."""
        return self.index < 0


@dataclass(frozen=True)
class RollingCall:
    """One denoiser call of the rolling schedule: S groups in frame order, ``groups[g].step == S - 1 - g``."""

    index: int  # k: 0, 1, 2, ...
    group_size: int  # G: frames per group
    groups: Tuple[RollingGroup, ...]  # oldest first: groups[0] takes its last step, groups[-1] enters as noise

    @property
    def start(self) -> int:
        """Global frame of local frame 0 (negative while warm-up slots lead the call)."""
        return self.groups[0].start

    @property
    def n_frames(self) -> int:
        """N = S * G: the call's static frame count."""
        return len(self.groups) * self.group_size

    @property
    def warmup_groups(self) -> int:
        """Leading groups that are warm-up slots."""
        return sum(g.warmup for g in self.groups)

    @property
    def frame_steps(self) -> Tuple[int, ...]:
        """The DDIM step index of every local frame."""
        return tuple(g.step for g in self.groups for _ in range(self.group_size))

    @property
    def emit_range(self) -> Tuple[int, int]:
        """Global frames this call emits: the real frames of its oldest group (empty in warm-up and tail calls)."""
        first = self.groups[0]
        return first.start, first.start + first.valid

    @property
    def newest_frame(self) -> int:
        """Global frame of the newest real frame the call reads (its conditions must have arrived)."""
        return max(g.start + g.valid - 1 for g in self.groups if g.valid)


def _make_call(k: int, total: Optional[int], s: int, g: int) -> RollingCall:
    groups = []
    for slot in range(s):
        q = k - (s - 1) + slot
        start = q * g
        valid = 0 if q < 0 else g if total is None else max(0, min(g, total - start))
        groups.append(RollingGroup(index=q, start=start, step=s - 1 - slot, valid=valid))
    return RollingCall(index=k, group_size=g, groups=tuple(groups))


def _n_calls(total: int, s: int, g: int) -> int:
    n_groups = -(-total // g)
    return n_groups + s - 1 if n_groups else 0  # every group enters once, then S-1 calls drain the pipeline


def plan_rolling(total_frames: int, steps: int, group: int, *, max_frames: int = MAX_CHUNK_FRAMES) -> List[RollingCall]:
    """Rolling calls for a finite stream of ``total_frames`` frames: ``ceil(total / G) + S - 1`` calls (none if 0);
    every frame is emitted once, in order, after exactly the steps 0 .. S-1."""
    total = _at_least("total_frames", total_frames, 0)
    s, g = _check_rolling_args(steps, group, max_frames)
    return [_make_call(k, total, s, g) for k in range(_n_calls(total, s, g))]


class StreamRollingPlanner:
    """Open-ended rolling planner fed with pose frame counts as Stage I emits them (StreamChunkPlanner's interface).

    Call k is ready once group k has all G of its frames; ``finish()`` returns the calls that take in the last,
    partial group and drain the pipeline. The concatenation equals ``plan_rolling(total, steps, group)``.
    """

    def __init__(self, steps: int, group: int, *, max_frames: int = MAX_CHUNK_FRAMES) -> None:
        self.steps, self.group = _check_rolling_args(steps, group, max_frames)
        self.frames = 0  # pose frames received so far
        self.next_index = 0
        self.finished = False

    def push(self, n_new_frames: int) -> List[RollingCall]:
        """Add ``n_new_frames`` pose frames; return the calls that became ready, in order (often none)."""
        n = _at_least("n_new_frames", n_new_frames, 0)
        if self.finished:
            raise ValueError("StreamRollingPlanner.push() after finish(): the stream has ended")
        self.frames += n
        ready = []
        while (self.next_index + 1) * self.group <= self.frames:
            ready.append(_make_call(self.next_index, None, self.steps, self.group))
            self.next_index += 1
        return ready

    def finish(self) -> List[RollingCall]:
        """End the stream; return the remaining calls (the last partial group, the drain); then []."""
        if self.finished:
            return []
        self.finished = True
        tail = [_make_call(k, self.frames, self.steps, self.group)
                for k in range(self.next_index, _n_calls(self.frames, self.steps, self.group))]
        self.next_index += len(tail)
        return tail


def stage2_planner(schedule: str, chunk: int, overlap: int, steps: Optional[int], *,
                   max_frames: int = MAX_CHUNK_FRAMES):
    """The open-ended Stage II planner of a schedule: StreamChunkPlanner (chunk, overlap) or StreamRollingPlanner
    (``steps`` groups of chunk / steps frames; overlap unused). Both push/finish; their items have ``emit_range``."""
    if schedule == "chunk":
        return StreamChunkPlanner(chunk, overlap, max_chunk=max_frames)
    if schedule == "rolling":
        if steps is None:
            raise ValueError("--schedule rolling: the layout of its calls needs the number of denoising steps")
        return StreamRollingPlanner(steps, group_size(chunk, steps), max_frames=max_frames)
    raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


__all__ = ["SCHEDULES", "group_size", "RollingGroup", "RollingCall", "plan_rolling", "StreamRollingPlanner",
           "stage2_planner"]
