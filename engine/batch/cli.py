"""`engine batch`: many long renders from a manifest, resumable, on one machine or fanned out over Ray.

    engine batch jobs.jsonl --out-dir renders/                    one job after another, models loaded once
    engine batch jobs.csv --out-dir renders/ --ray auto           one Ray task per job on a local Ray instance
    engine batch jobs.csv --out-dir /nfs/renders --ray HOST:6379 --gpus-per-job 1    an existing Ray cluster

The manifest is JSON lines (one object per line) or CSV with a header row. Every job names ``image``, ``audio`` and
``output`` (a file name: ``intro`` or ``intro.mp4``); optional per-job fields override the command's flags:
``steps``, ``guidance``, ``seed``, ``smga_steps``, ``smga_guidance``, ``window``, ``hop``, ``crossfade``, ``chunk``,
``overlap``, ``pose`` (keypoints that replace Stage I) and ``init_pose`` (the reference image's pose). Relative
paths are read against the manifest's folder. Blank lines and lines starting with ``#`` are skipped.

Every job leaves DIR/<output>.mp4 (written in segments into DIR/.<output>.mp4.resume/, joined into a temp file and
renamed only when complete; a job killed mid-render continues from its last segment on the next run, --force starts
it over) and DIR/<output>.json, its report: status (ok / error / skipped), frames, durations, first-frame latency,
real-time factor, the settings, the model, and the sha256 of every input. A re-run skips a job whose mp4 and report
are complete and whose inputs, settings and model are unchanged, and renders the rest; a failing job is reported and
the others go on. The exit code is 0 only when every job succeeded (rendered or skipped); 1 when a job failed; 2 for
a bad manifest or flag.

With ``--ray`` every job to render becomes one Ray task; each worker process loads the models once (and keeps them
for the jobs it runs) and writes the mp4 itself, so inputs and DIR must be paths every node sees (a shared
filesystem). The driver gathers the results into the same reports. Without ``--ray`` nothing of Ray is imported.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from engine.batch.run import run_batch
from engine.extras import install_hint, require_extra
from engine.native_memory import limit_arenas
from engine.options import (CLIError, RawDefaultsHelpFormatter, add_audio_bitrate_flag, add_backend_flags,
                            add_model_flags, add_settings_flags, interrupt_exit_code, setup_logging,
                            sigterm_as_interrupt)
from engine.preflight import check_device
from engine.settings import OFFLINE

log = logging.getLogger(__name__)


def cmd_batch(args) -> int:
    """`engine batch`: exit code 0 when every job is rendered or skipped, 1 when one failed."""
    if args.gpus_per_job < 0 or args.cpus_per_job < 0 or args.ray_num_cpus < 1 or (args.threads or 1) < 1:
        raise CLIError("--gpus-per-job and --cpus-per-job must be >= 0, --ray-num-cpus and --threads >= 1")
    if not args.ray:  # Ray workers run on other machines: their devices are theirs
        check_device(args.device)
    if args.gpus_per_job and not args.ray:
        log.warning("--gpus-per-job applies to Ray tasks only; without --ray jobs run here on --device")
    if args.ray:
        require_extra("ray", "--ray")  # before any job is planned
    else:
        limit_arenas()  # jobs of hours keep the heap flat (engine/native_memory.py); before any thread starts
    with sigterm_as_interrupt():
        return run_batch(args)[0]



def _add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, metavar="MANIFEST",
                   help="jobs: JSON lines or CSV with image, audio, output (+ optional per-job settings)")
    p.add_argument("--out-dir", type=Path, required=True, help="where <output>.mp4 and <output>.json go")
    p.add_argument("--force", action="store_true", help="render every job again, even complete ones")
    add_audio_bitrate_flag(p)
    r = p.add_argument_group(f"Ray (the ray extra: {install_hint('ray')})")
    r.add_argument("--ray", metavar="ADDRESS|auto",
                   help="fan jobs out as Ray tasks: 'auto' starts a local Ray instance on this machine; an address "
                        "(HOST:6379, ray://HOST:10001) joins an existing cluster. Inputs and --out-dir must be on "
                        "storage every node sees")
    r.add_argument("--gpus-per-job", type=float, default=0.0, help="GPUs each Ray task asks for (0: CPU only)")
    r.add_argument("--cpus-per-job", type=float, default=1.0, help="CPUs each Ray task asks for")
    r.add_argument("--ray-num-cpus", type=int, default=2,
                   help="CPUs of the local instance that --ray auto starts (jobs at once = this / --cpus-per-job)")
    add_model_flags(p)
    add_settings_flags(p, OFFLINE)
    add_backend_flags(p)


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Register `engine batch` on the CLI's subparsers."""
    p = subparsers.add_parser("batch", help="render many jobs from a manifest (resumable; optional Ray fan-out)",
                              description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    _add_batch_args(p)
    p.set_defaults(func=cmd_batch)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m engine.batch MANIFEST --out-dir DIR ...`: the batch command on its own (same flags and exit
    codes as `engine batch`)."""
    ap = argparse.ArgumentParser(prog="engine batch", description=__doc__,
                                 formatter_class=RawDefaultsHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    _add_batch_args(ap)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return cmd_batch(args)
    except CLIError as e:
        print(f"engine batch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("engine batch: interrupted; no partial output was left", file=sys.stderr)
        return interrupt_exit_code(e)



__all__ = ["add_batch_parser", "cmd_batch", "main"]
