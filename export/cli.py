"""`engine export`: ONNX and TensorRT artifacts for every network, cached by what defines them.

    engine export --preset tiny --out A --format onnx
    engine export --weights W --out A --format all --fp16 --timing-cache A/timing.cache
    engine export --preset mmgt --random-weights --only denoising_unet --out A --skip-parity   (release-size graph)

For each network (and format) the cache key of the artifact is computed first; a valid artifact under
``<out>/<network>/<cache_key>/`` is reused ("cached"), a missing, partial or edited one is built ("built") -- or,
with ``--no-build``, refused. One progress line per network, then a summary table. ``engine/cli.py`` mounts the
sub-command with ``add_export_parser`` and runs it with ``run_export``, handing it the loader of the model set
(``engine.models.export_model_set``): export imports no engine module (DESIGN.md). This module stays light at module
level (``engine --help`` imports it); onnx, torch and TensorRT are imported when the command runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

from mmgt.contract import DEFAULT_CHUNK
from mmgt.contracts import NETWORKS

from .manifest import (DEFAULT_OPSET, DEFAULT_OPT_LEVEL, DEFAULT_WORKSPACE_GB, ONNX_NAME, PLAN_NAME, ArtifactError,
                       artifact_dir, atomic_directory, cache_key, config_hash, make_manifest, network_weights,
                       validate_artifact, weights_digest, write_manifest)

log = logging.getLogger(__name__)

FORMAT_CHOICES = {"onnx": ("onnx",), "tensorrt": ("tensorrt",), "all": ("onnx", "tensorrt")}
# networks (mmgt.contracts.NETWORKS names) -> a model set holding them (a ModelSet or a namespace with .cfg)
ModelLoader = Callable[[Sequence[str]], Any]


class ExportUsageError(ValueError):
    """A bad combination of flags or inputs; reported as one line."""


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command to an argparse sub-parser set; the caller sets its ``func`` (engine/cli.py: a
    handler that calls ``run_export`` with a model loader)."""
    p = subparsers.add_parser(
        "export", help="export every network to ONNX / TensorRT (cached artifacts)",
        description="Export the MMGT networks to ONNX (checked against torch in onnxruntime) and TensorRT plans. "
                    "Artifacts are cached under OUT/<network>/<cache_key>/ and reused when nothing changed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--preset", help="model preset: tiny (random weights, CPU) or mmgt (default with --weights)")
    src.add_argument("--weights", type=Path, help="release weights directory (MMGT_SPEC.md section 6)")
    src.add_argument("--random-weights", action="store_true",
                     help="a trained preset without --weights: seeded random weights, only the networks exported "
                          "(size/time checks of the release graphs)")
    out = p.add_argument_group("artifacts")
    out.add_argument("--out", type=Path, required=True, help="artifact directory")
    out.add_argument("--format", choices=sorted(FORMAT_CHOICES), default="onnx", help="what to build")
    out.add_argument("--fp16", action="store_true", help="fp16 artifacts (Stage I and audio encoders stay fp32)")
    out.add_argument("--only", nargs="+", metavar="NET",
                     help=f"networks to export (default all: {', '.join(NETWORKS)})")
    out.add_argument("--force", action="store_true", help="rebuild even when a valid artifact exists")
    out.add_argument("--no-build", action="store_true",
                     help="build nothing: check the artifacts and fail on any missing or invalid one")
    shapes = p.add_argument_group("shapes (engines are static: use the values the engine will run with)")
    shapes.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="Stage II frames per render chunk")
    shapes.add_argument("--window", type=int, help="SMGA window in frames (default: the config's, 80)")
    shapes.add_argument("--guidance", type=float,
                        help="Stage II CFG scale the engine runs with (!= 1 doubles the denoiser batch); "
                             "default: the preset's sampler setting")
    shapes.add_argument("--smga-guidance", type=float,
                        help="Stage I (SMGA) guidance the engine runs with (!= 1: the null-condition row is part of "
                             "the SMGA graphs); default: the preset's")
    tune = p.add_argument_group("export settings")
    tune.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 17)")
    tune.add_argument("--skip-parity", action="store_true", help="skip the onnxruntime/TensorRT parity run")
    tune.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime provider for parity")
    tune.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (read and updated)")
    tune.add_argument("--opt-level", type=int, default=DEFAULT_OPT_LEVEL, help="TensorRT builder optimisation level")
    tune.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB, help="TensorRT workspace limit")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Key fields
# ----------------------------------------------------------------------------------------------------------------
def key_fields(spec, cfg, shapes, digest: str, fmt: str, precision: str, opset: int,
               trt: Optional[Dict[str, Any]] = None, source_precision: Optional[str] = None) -> Dict[str, Any]:
    """Everything that changes the artifact (and nothing else): its hash is the cache key."""
    fields = {"network": spec.name, "contract_version": spec.version, "format": fmt, "precision": precision,
              "config_hash": config_hash(cfg, spec.config_sections), "weights_digest": digest,
              "shapes": spec.shape_values(shapes), "io": spec.io_json(source_precision or precision),
              "opset": opset, "exporter": spec.exporter, "meta": dict(spec.meta)}
    if fmt == "tensorrt":
        fields["onnx_precision"] = source_precision
        fields["tensorrt"] = dict(trt or {})
    return fields


def _required_files(fmt: str) -> tuple:
    return (ONNX_NAME, PLAN_NAME) if fmt == "tensorrt" else (ONNX_NAME,)


# ----------------------------------------------------------------------------------------------------------------
# One artifact
# ----------------------------------------------------------------------------------------------------------------
def _build(spec, models, directory: Path, fields: Dict[str, Any], args, fmt: str, precision: str,
           source_precision: str) -> Dict[str, Any]:
    """Export (and build the plan) into ``directory``; returns the manifest written there."""
    from .onnx import export_onnx

    info: Dict[str, Any] = {"description": spec.description, "inputs": list(spec.input_names),
                            "outputs": list(spec.output_names), "config": models.cfg.name,
                            "trained": bool(models.cfg.trained), "versions": _versions()}
    mods = network_weights(models, spec)
    info["weights_digests"] = {dt: weights_digest(mods, dt) for dt in ("float32", "float16", "bfloat16")}
    onnx_info = export_onnx(spec, models, directory, precision=source_precision, opset=args.opset,
                            parity=not args.skip_parity, provider=args.provider)
    info["parity"] = onnx_info.pop("parity")
    info["onnx"] = onnx_info
    files = list(onnx_info["files"])
    if fmt == "tensorrt":
        from .tensorrt import build_plan, check_plan_parity

        info["tensorrt"] = build_plan(spec, directory / ONNX_NAME, directory / PLAN_NAME, precision=precision,
                                      timing_cache=args.timing_cache, opt_level=args.opt_level,
                                      workspace_gb=args.workspace_gb)
        files.append(PLAN_NAME)
        if not args.skip_parity:
            info["onnx_parity"] = info["parity"]
            info["parity"] = check_plan_parity(spec, directory / PLAN_NAME, spec.module(models).eval(), precision)
            if not info["parity"]["passed"]:
                from .onnx import ExportError

                p = info["parity"]
                raise ExportError(f"{spec.name}: TensorRT plan differs from torch by {p['max_abs_diff']:.3g} "
                                  f"(output {p['worst_output']}), tolerance {p['tolerance']:.1g}")
    info["seconds"] = round(onnx_info["seconds"] + info.get("tensorrt", {}).get("build_seconds", 0.0), 3)
    manifest = make_manifest(fields, directory, files, info)
    write_manifest(directory, manifest)
    return manifest


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _size(manifest: Optional[Dict[str, Any]]) -> int:
    return sum(f["size"] for f in (manifest or {}).get("files", {}).values())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def _parity_text(manifest: Optional[Dict[str, Any]]) -> str:
    parity = (manifest or {}).get("info", {}).get("parity")
    if not parity:
        return "skipped"
    return f"{parity['max_abs_diff']:.1e}" + ("" if parity["passed"] else " FAIL")


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------
def run_export(args, load_models: ModelLoader, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Run ``engine export`` with parsed ``args``: 0 when every artifact is valid, 1 on failures, 2 on bad usage.
    ``load_models(networks)`` gives the model set to export, once the flags are checked."""
    out = out or sys.stdout
    err = err or sys.stderr
    from mmgt.weights import WeightsError

    try:
        return _run(args, load_models, out, err)
    except (ExportUsageError, ArtifactError, WeightsError) as e:
        print(f"engine export: error: {e}", file=err)
        return 2


def _run(args, load_models: ModelLoader, out: TextIO, err: TextIO) -> int:
    from mmgt.contract import Shapes
    from mmgt.contracts import contract_notes, network_contracts

    from .onnx import ExportError
    from .tensorrt import source_precision as trt_source_precision
    from .tensorrt import tensorrt_problem, trt_environment

    # 1. flags that cannot work, before anything is loaded
    formats = FORMAT_CHOICES[args.format]
    if args.force and args.no_build:
        raise ExportUsageError("--force and --no-build contradict each other")
    if args.opset < 17:
        raise ExportUsageError(f"--opset must be >= 17, got {args.opset}")
    unknown = [n for n in (args.only or ()) if n not in NETWORKS]
    if unknown:
        raise ExportUsageError(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(NETWORKS)}")
    trt_env = None
    if "tensorrt" in formats:
        problem = tensorrt_problem()
        if problem:
            raise ExportUsageError(problem)
        trt_env = trt_environment()
    requested = [n for n in NETWORKS if not args.only or n in args.only]

    # 2. models, shapes, contracts
    t_start = time.perf_counter()
    models = load_models(requested)
    cfg = models.cfg
    try:
        shapes = Shapes.from_config(cfg, chunk=args.chunk, guidance=args.guidance, window=args.window,
                                    smga_guidance=args.smga_guidance)
    except ValueError as e:
        raise ExportUsageError(str(e)) from None
    specs = network_contracts(cfg, shapes)
    notes = contract_notes(cfg, shapes)
    for name in requested:
        if name in notes:
            if args.only:
                raise ExportUsageError(f"{name}: {notes[name]}")
            print(f"  {name:<18} not exported: {notes[name]}", file=out)
    todo = [specs[n] for n in requested if n in specs]
    precision_req = "fp16" if args.fp16 else "fp32"
    print(f"engine export: {cfg.name} -> {args.out} ({args.format}, {precision_req}, chunk {shapes.chunk}, "
          f"window {shapes.smga_window}, denoiser batch {shapes.unet_batch}, SMGA batch {shapes.smga_batch})",
          file=out)

    # 3. each network x format: cached, built, refused or failed
    rows: List[Dict[str, Any]] = []
    total = len(todo) * len(formats)
    for spec in todo:
        digest = weights_digest(network_weights(models, spec))
        for fmt in formats:
            t0 = time.perf_counter()
            precision = spec.precision(precision_req)
            src_precision = precision if fmt == "onnx" else trt_source_precision(precision)
            trt_fields = None
            if fmt == "tensorrt":
                trt_fields = {"version": trt_env["version"], "compute_capability": trt_env["compute_capability"],
                              "typing": "strong" if src_precision == "fp16" else "weak",
                              "opt_level": args.opt_level, "workspace_gb": args.workspace_gb}
            fields = key_fields(spec, cfg, shapes, digest, fmt, precision, args.opset, trt_fields, src_precision)
            key = cache_key(fields)
            directory = artifact_dir(args.out, spec.name, key)
            row = {"network": spec.name, "format": fmt, "precision": precision, "key": key, "manifest": None}
            problem = None
            if args.force:
                problem = "--force"
            else:
                try:
                    row["manifest"] = validate_artifact(directory, expect_key=key, require=_required_files(fmt))
                    row["status"] = "cached"
                except ArtifactError as e:
                    problem = str(e) if directory.exists() else "not exported yet"
            if problem is not None and args.no_build:
                row["status"], row["error"] = "refused", problem
            elif problem is not None:
                if directory.exists():
                    log.warning("%s %s: rebuilding (%s)", spec.name, fmt, problem)
                try:
                    with atomic_directory(directory) as tmp:
                        _build(spec, models, tmp, fields, args, fmt, precision, src_precision)
                    row["manifest"] = validate_artifact(directory, expect_key=key, require=_required_files(fmt))
                    row["status"] = "built" if problem in ("not exported yet", "--force") else "rebuilt"
                except (ExportError, RuntimeError, ArtifactError) as e:
                    row["status"], row["error"] = "failed", str(e).splitlines()[0]
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            _progress(out, len(rows), total, row)

    # 4. summary
    _summary(out, rows, time.perf_counter() - t_start)
    bad = [r for r in rows if r["status"] in ("refused", "failed")]
    for r in bad:
        print(f"engine export: {r['network']} {r['format']} {r['status']}: {r['error']}", file=err)
    return 1 if bad else 0


def _progress(out: TextIO, i: int, n: int, row: Dict[str, Any]) -> None:
    text = f"[{i}/{n}] {row['network']:<18} {row['format']:<8} {row['status']:<8}"
    if row["status"] in ("cached", "built", "rebuilt"):
        text += (f" {_human(_size(row['manifest'])):>9}  parity {_parity_text(row['manifest'])}  "
                 f"{row['seconds']:.1f} s  {row['key']}")
    else:
        text += f" {row.get('error', '')}"
    print(text, file=out, flush=True)


def _summary(out: TextIO, rows: List[Dict[str, Any]], seconds: float) -> None:
    header = f"{'network':<18} {'format':<8} {'prec':<5} {'size':>9} {'parity':>12} {'seconds':>8}  status"
    print("", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        size = _human(_size(r["manifest"])) if r["manifest"] else "-"
        parity = _parity_text(r["manifest"]) if r["manifest"] else "-"
        print(f"{r['network']:<18} {r['format']:<8} {r['precision']:<5} {size:>9} {parity:>12} "
              f"{r['seconds']:>8.1f}  {r['status']}", file=out)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("built", "rebuilt", "cached", "refused", "failed")}
    print(f"{len(rows)} artifacts in {seconds:.1f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v),
          file=out)


def build_parser() -> argparse.ArgumentParser:
    """A parser with the export sub-command alone (``engine export`` is mounted by engine/cli.py)."""
    ap = argparse.ArgumentParser(prog="engine")
    sub = ap.add_subparsers(dest="command")
    add_export_parser(sub)
    return ap


__all__ = ["add_export_parser", "run_export", "key_fields", "build_parser", "ExportUsageError", "ModelLoader"]
