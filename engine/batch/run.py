"""The job loop of `engine batch`: plan every job (skip the complete ones, fail the ones with a missing input at
once), render the rest here or on Ray, write each job's report, print the summary table.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from engine.batch.fingerprint import (JobInputError, complete_report, file_digest, fingerprint, model_identity,
                                      write_json)
from engine.batch.job import MODEL_KEYS, JobPayload, run_job
from engine.batch.manifest import Job, read_manifest
from engine.batch.ray_exec import run_on_ray
from engine.options import CLIError, settings_from, sigterm_as_interrupt  # noqa: F401 (re-exported)
from engine.settings import OFFLINE, RenderSettings

log = logging.getLogger(__name__)

REPORT_VERSION = 1
STATUSES = ("ok", "error", "skipped")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Item:
    job: Job
    mp4: Path
    report_path: Path
    settings: RenderSettings
    inputs: Dict[str, Dict[str, Any]]
    fingerprint: str
    report: Optional[Dict[str, Any]] = None  # set once the job's outcome is known


def _base_report(item: _Item, model: Dict[str, Any]) -> Dict[str, Any]:
    return {"version": REPORT_VERSION, "name": item.job.name, "manifest_line": item.job.line,
            "output": str(item.mp4), "settings": asdict(item.settings), "model": model, "inputs": item.inputs,
            "fingerprint": item.fingerprint}


def _finish(item: _Item, model: Dict[str, Any], outcome: Dict[str, Any]) -> None:
    rep = _base_report(item, model)
    rep.update({"status": outcome["status"], "error": outcome.get("error"), "frames": 0, "duration_seconds": 0.0,
                "audio_seconds": 0.0, "wall_seconds": 0.0, "first_frame_latency": None, "real_time_factor": None,
                "output_bytes": None})
    rep.update({k: v for k, v in outcome.items() if k != "status"})
    rep["rendered_at" if rep["status"] == "ok" else "failed_at"] = _now()
    if rep["status"] == "error":
        rep["output_bytes"] = None  # an mp4 there, if any, is from an earlier run and not this report's
    write_json(item.report_path, rep)
    item.report = rep


def _plan(jobs: List[Job], out_dir: Path, base: RenderSettings, model: Dict[str, Any], force: bool) -> List[_Item]:
    """Digest every input; settle skipped jobs and jobs with a missing input at once (their reports written)."""
    items = []
    for job in jobs:
        settings = job.settings(base)
        mp4, report_path = out_dir / f"{job.name}.mp4", out_dir / f"{job.name}.json"
        try:
            inputs = {role: file_digest(p, role) for role, p in job.inputs().items()}
        except JobInputError as e:
            item = _Item(job, mp4, report_path, settings, {}, "")
            log.warning("job %s (manifest line %d): %s", job.name, job.line, e)
            _finish(item, model, {"status": "error", "error": str(e)})
            items.append(item)
            continue
        item = _Item(job, mp4, report_path, settings, inputs, fingerprint(inputs, settings, model))
        prev = None if force else complete_report(mp4, report_path, item.fingerprint)
        if prev is not None:
            rep = dict(prev, status="skipped", skipped_at=_now(), manifest_line=job.line, inputs=inputs)
            write_json(report_path, rep)
            item.report = rep
            log.info("job %s: %s is complete and up to date; skipped", job.name, mp4)
        items.append(item)
    return items


def _payload(item: _Item, model_args: argparse.Namespace, threads: Optional[int], args) -> JobPayload:
    j = item.job
    return JobPayload(name=j.name, image=str(j.image), audio=str(j.audio), pose=str(j.pose) if j.pose else None,
                      init_pose=str(j.init_pose) if j.init_pose else None, output=str(item.mp4),
                      settings=item.settings, model_args=model_args, threads=threads,
                      audio_bitrate=args.audio_bitrate, restart=bool(getattr(args, "force", False)))


def _model_args(args) -> argparse.Namespace:
    """Only what engine.models.load_model_set reads (the parsed args also hold the subcommand's function)."""
    keys = MODEL_KEYS + ("steps", "guidance", "smga_steps", "smga_guidance", "seed", "window", "hop", "crossfade",
                         "chunk", "overlap", "schedule")
    return argparse.Namespace(**{k: getattr(args, k, None) for k in keys})


def _run_local(todo: List[_Item], model_args, done: Callable[[_Item, Dict[str, Any]], None], args) -> None:
    from tqdm import tqdm

    for item in todo:
        def bar(total: int, name=item.job.name):
            return tqdm(total=total, unit="frame", desc=name, position=1, leave=False,
                        disable=getattr(args, "quiet", False) or None)

        done(item, run_job(_payload(item, model_args, args.threads, args), bar))


def format_summary(items: List[_Item], out_dir: Path) -> str:
    """The table printed at the end: one row per job, then the counts."""
    rows = [("JOB", "STATUS", "FRAMES", "MEDIA S", "WALL S", "RTF", "1ST FRAME", "ERROR")]
    counts = {s: 0 for s in STATUSES}
    pending = 0
    for it in items:
        r = it.report
        if r is None:
            rows.append((it.job.name, "not run", "", "", "", "", "", ""))
            pending += 1
            continue
        counts[r["status"]] += 1
        ok = r["status"] != "error"
        ffl = r.get("first_frame_latency")
        rows.append((it.job.name, r["status"], str(r.get("frames", 0)) if ok else "-",
                     f"{r.get('duration_seconds', 0):.2f}" if ok else "-",
                     f"{r.get('wall_seconds', 0):.2f}" if r["status"] == "ok" else "-",
                     f"{r.get('real_time_factor') or 0:.2f}" if ok else "-",
                     f"{ffl * 1000:.0f} ms" if ok and ffl is not None else "-", r.get("error") or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row) -> str:  # names and statuses left-aligned, numbers right-aligned, the error as it is
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row[:-1], widths))]
        return "  ".join([*cells, row[-1]]).rstrip()

    tail = (f"{len(items)} job{'s' if len(items) != 1 else ''}: {counts['ok']} rendered, "
            f"{counts['skipped']} skipped, {counts['error']} failed")
    if pending:
        tail += f", {pending} not run"
    return "\n".join([*(line(row) for row in rows), f"{tail} (reports in {out_dir})"])


def run_batch(args) -> Tuple[int, List[_Item]]:
    """The whole command: (exit code, items with their reports). Prints the summary table."""
    from tqdm import tqdm

    # 1. manifest, output folder, settings: every problem here is a one-line error before any work
    jobs = read_manifest(args.manifest)
    base = settings_from(args, OFFLINE)
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out-dir {out_dir}: cannot create it ({e.strerror or e})") from e
    if not os.access(out_dir, os.W_OK):
        raise CLIError(f"--out-dir {out_dir}: not writable")
    out_dir = out_dir.resolve()
    model = model_identity(args)
    # 2. plan: digests, skips, missing inputs
    items = _plan(jobs, out_dir, base, model, args.force)
    todo = [it for it in items if it.report is None]
    log.info("%d jobs: %d to render, %d settled already", len(items), len(todo), len(items) - len(todo))
    quiet = getattr(args, "quiet", False)
    # 3. render
    try:
        with tqdm(total=len(items), initial=len(items) - len(todo), unit="job", desc="batch", position=0,
                  disable=quiet or None) as jobs_bar:
            def done(item: _Item, outcome: Dict[str, Any]) -> None:
                _finish(item, model, outcome)
                jobs_bar.update(1)

            if todo and args.ray:  # Ray workers get their threads from their CPU share (engine.batch.ray_exec)
                payloads = [(item, _payload(item, _model_args(args), None, args)) for item in todo]
                run_on_ray(payloads, done, args)
            elif todo:
                _run_local(todo, _model_args(args), done, args)
    except KeyboardInterrupt:
        print(format_summary(items, out_dir), flush=True)
        raise
    print(format_summary(items, out_dir), flush=True)
    failed = sum(1 for it in items if it.report["status"] == "error")
    return (1 if failed else 0), items


__all__ = ["STATUSES", "REPORT_VERSION", "run_batch", "format_summary", "sigterm_as_interrupt"]
