"""Per-network speed of MMGT at a preset's sizes, random weights: latency, throughput, FLOPs, MFU, fp16 accuracy.

    python -m benchmarks.bench_networks --preset mmgt --device cuda --dtype fp16 fp32 --compile --cuda-graphs
    python -m benchmarks.bench_networks --preset tiny --device cpu            # seconds; what CI can run

Networks (``--networks``, default all), each called through its contract (mmgt/contracts.py: the inputs' names,
shapes and ranges and the torch call the engine and the exported graphs use; nothing is declared twice here):

    unet3d        one denoising step of a render chunk of C frames (bank, audio tokens, masks, pose features);
                  batch 1 (no CFG) and batch 2 (CFG: unconditional + conditional rows in one call)
    vae_decode    AutoencoderKL decode of C latents to frames          taesd_decode  AutoencoderTiny decoder, same
    smga          one Stage I decoder step on an 80-frame window, without and with the CFG batch; and the
                  condition encoder (once per window)
    reference_net once per avatar: the reference latent -> attention bank
    image_encoder once per avatar: CLIP image embedding                vae_encode    once per avatar: image -> latent
    pose_guider   C pose frames -> features                            audio_proj    C frames of wav2vec2 windows
    wavlm         WavLM on 3.2 s of audio (SMGA condition)             wav2vec2      wav2vec2 on 3.2 s (all layers)

Variants per network (fp16; or fp32 when it is the only dtype): ``eager``; ``channels_last`` (conv networks,
``--channels-last``); ``graph`` (the eager call captured in a CUDA graph, ``--cuda-graphs``); ``compile``
(``torch.compile``, ``--compile``); ``compile_graph`` (the compiled call captured in a CUDA graph). A variant that
fails records its error and the run goes on. fp32 runs with TF32 off: it is the accuracy reference.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one eager call (matmuls, convolutions, attention;
2 per multiply-add); achieved TFLOP/s = FLOPs / median latency; MFU = that / the GPU's dense fp16 peak. On CUDA the
UNet3D step also gets a per-module-kind time/FLOP breakdown (CUDA events around leaf modules), a kernel table from
``torch.profiler`` (``--profile``) and a probe of the SDPA backends at its attention shapes.

The JSON (``--out`` or benchmarks/results/networks-<preset>-<device>-<date>.json) is rewritten after every
network, so a run stopped by a time limit keeps what it finished.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.common import machine_info, peak_tflops, result_path, synchronize, time_call, write_json
from mmgt.config import FPS, MMGTConfig, get_preset

log = logging.getLogger("benchmarks.bench_networks")

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
NETWORKS = ("unet3d", "vae_decode", "smga", "reference_net", "pose_guider", "audio_proj", "wavlm", "wav2vec2",
            "taesd_decode", "image_encoder", "vae_encode")


# ----------------------------------------------------------------------------------------------------------------
# What is benchmarked: a network (built once) and its cases (input sets and how to call it)
# ----------------------------------------------------------------------------------------------------------------
Inputs = Tuple[tuple, dict]


@dataclass
class Case:
    """One way of calling a network: fresh inputs in a dtype, and the call returning one output tensor."""

    name: str  # e.g. "unet3d_step_b2_cfg"
    unit: str  # what one call produces, in words
    frames: Optional[int]  # frames one call produces (throughput); None when not per frame
    make_inputs: Callable[[torch.dtype], Inputs]  # same values for every dtype (drawn in fp32, then cast)
    call: Callable[[nn.Module, tuple, dict], torch.Tensor]
    shapes: Dict[str, object] = field(default_factory=dict)  # input shapes, for the JSON
    graphable: bool = True  # CUDA-graph capture possible (no host copies inside the call)
    compilable: bool = True


@dataclass
class Network:
    name: str
    build: Callable[[], nn.Module]  # fp32, eval, on the target device
    cases: List[Case]
    conv: bool = False  # conv-dominated: try channels_last
    note: str = ""


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randomise_zero_init(module: nn.Module, std: float = 0.05) -> int:
    """Zero-initialised weights (motion proj_out, MM-HAA zero convs, PoseGuider conv_out) get small random values,
    so every branch contributes to the output and the fp16-vs-fp32 comparison covers it (speed is unaffected)."""
    changed = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2 and not torch.any(p):
                p.normal_(0.0, std)
                changed += 1
    return changed


def _on_device(build: Callable[[], nn.Module], device: torch.device) -> Callable[[], nn.Module]:
    """Build with ``device`` as the default device (random init of 1.4 B parameters on a GPU, not the CPU)."""
    def make() -> nn.Module:
        with torch.device(device):
            module = build()
        module = module.to(device).eval().requires_grad_(False)
        _randomise_zero_init(module)
        return module
    return make


def contract_case(name: str, unit: str, frames: Optional[int], contract, attr: str, device: torch.device,
                  seed: int, **kwargs) -> Case:
    """A case that calls the network exactly as the engine does: its contract's torch call on the contract's sample
    inputs (names, shapes, ranges from mmgt/contracts.py; nothing declared here). The checked output is the last
    one (the ReferenceNet's last bank entry depends on the whole network).

    The module under test is held as ``attr`` of the model set the contract's call is made from. Floating inputs
    follow the case's dtype; a contract that is fp32-only (Stage I, the speech encoders) is timed in the case's
    dtype all the same, to show what fp16 would do."""
    from types import SimpleNamespace

    from mmgt.contract import FLOAT

    calls: Dict[int, Callable] = {}  # id(module) -> the contract's call on it (one per module variant)

    def make(dtype: torch.dtype) -> Inputs:
        feeds = contract.sample_inputs("fp32", seed=seed, device=device)
        follow = {t.name for t in contract.inputs if t.dtype == FLOAT or not contract.allow_fp16}
        return tuple(feeds[n].to(dtype) if n in follow else feeds[n] for n in contract.input_names), {}

    def call(m, a, k):
        fn = calls.get(id(m))
        if fn is None:
            fn = calls[id(m)] = contract.module(SimpleNamespace(**{attr: m}))
        out = fn(*a)
        return out[-1] if isinstance(out, (tuple, list)) else out

    shapes = {t.name: list(t.shape) for t in contract.inputs}
    return Case(name, unit, frames, make, call, shapes, **kwargs)


def build_networks(cfg: MMGTConfig, chunk: int, device: torch.device, names: Sequence[str]) -> List[Network]:
    """The selected networks at the preset's sizes, in ``NETWORKS`` order, each called through its contract."""
    from mmgt.audio_proj import AudioProjModel
    from mmgt.contract import Shapes
    from mmgt.contracts import network_contracts
    from mmgt.image_encoder import build_clip
    from mmgt.pose_guider import PoseGuider
    from mmgt.smga import build_smga
    from mmgt.speech_encoders import build_wav2vec2, build_wavlm
    from mmgt.vae import build_tiny_decoder, build_vae

    def unet3d() -> nn.Module:  # mmgt.unet3d / reference_net import diffusers' UNet blocks: only when asked for
        from mmgt.unet3d import UNet3D
        return UNet3D(cfg.unet)

    def reference_net() -> nn.Module:
        from mmgt.reference_net import ReferenceNet
        return ReferenceNet(cfg.unet)

    # the contracts at this chunk, without and with classifier-free guidance in both stages
    plain = network_contracts(cfg, Shapes.from_config(cfg, chunk=chunk, guidance=1.0, smga_guidance=1.0))
    guided = network_contracts(cfg, Shapes.from_config(cfg, chunk=chunk, guidance=3.5, smga_guidance=cfg.smga.guidance))
    res, w = cfg.resolution, cfg.smga.window
    nets: Dict[str, Network] = {}

    def case(name, unit, frames, contract, attr, seed, **kw) -> Case:
        return contract_case(name, unit, frames, contract, attr, device, seed, **kw)

    # 1. Stage II denoiser: one step, batch 1 (no CFG) and batch 2 (CFG rows in one call)
    nets["unet3d"] = Network("unet3d", _on_device(unet3d, device), [
        case("unet3d_step_b1", f"{chunk} frames x 1 denoising step, no CFG", chunk, plain["denoising_unet"],
             "denoising_unet", 1),
        case("unet3d_step_b2_cfg", f"{chunk} frames x 1 denoising step, CFG batch of 2", chunk,
             guided["denoising_unet"], "denoising_unet", 1)], conv=True)

    # 2. Decoders (diffusion-scale latents -> frames in [0, 1]): the frame decoder the model set decodes with
    decode = plain["vae_decoder"]
    nets["vae_decode"] = Network("vae_decode", _on_device(lambda: build_vae(cfg.vae), device), [
        case("vae_decode", f"decode {chunk} frames at {res}x{res}", chunk, decode, "frame_decoder", 2)], conv=True)
    taesd_width = min(64, cfg.vae.block_out_channels[0])  # TAESD's 64 at release size, narrower for toy presets
    nets["taesd_decode"] = Network(
        "taesd_decode", _on_device(lambda: build_tiny_decoder(cfg.vae, channels=taesd_width), device),
        [case("taesd_decode", f"decode {chunk} frames at {res}x{res}", chunk, decode, "frame_decoder", 2)], conv=True,
        note=f"AutoencoderTiny (TAESD layout, width {taesd_width}) decoder: the optional light decoder")

    # 3. Stage I denoiser: one DDIM step on the encoded condition (encoded once per window: smga_condition)
    smga_cases = [case("smga_step", f"1 decoder step, {w}-frame window, no CFG", w, plain["smga_denoise"], "smga", 3)]
    if "smga_denoise" in guided:
        smga_cases += [case("smga_step_cfg", f"1 decoder step, {w}-frame window, CFG batch of 2 (guidance "
                                             f"{cfg.smga.guidance})", w, guided["smga_denoise"], "smga", 3),
                       case("smga_condition", f"encode the audio condition of a {w}-frame window, with the null row",
                            w, guided["smga_condition"], "smga", 3)]
    nets["smga"] = Network("smga", _on_device(lambda: build_smga(cfg.smga, seed=cfg.seed), device), smga_cases,
                           note="the audio condition is encoded once per window (smga_condition), not per step")

    # 4. ReferenceNet: once per avatar
    nets["reference_net"] = Network("reference_net", _on_device(reference_net, device), [
        case("reference_net", "1 reference image -> attention bank", None, plain["reference_unet"],
             "reference_unet", 4)], conv=True)

    # 4b. the avatar's other encoders: CLIP embedding and the VAE's reference latent
    nets["image_encoder"] = Network("image_encoder", _on_device(lambda: build_clip(cfg.clip, seed=cfg.seed + 4),
                                                                device), [
        case("image_encoder", "1 reference image -> CLIP context", None, plain["image_encoder"], "clip", 8)])
    nets["vae_encode"] = Network("vae_encode", _on_device(lambda: build_vae(cfg.vae), device), [
        case("vae_encode", f"1 reference image at {res}x{res} -> latent", None, plain["vae_encoder"], "vae", 9)],
        conv=True)

    # 5. PoseGuider and audio projection on one chunk
    nets["pose_guider"] = Network("pose_guider", _on_device(lambda: PoseGuider(cfg.pose_guider), device), [
        case("pose_guider", f"{chunk} pose frames at {res}x{res} -> features", chunk, plain["pose_guider"],
             "pose_guider", 5)], conv=True)
    nets["audio_proj"] = Network("audio_proj", _on_device(lambda: AudioProjModel(cfg.audio_proj), device), [
        case("audio_proj", f"{plain['audio_proj'].inputs[0].shape[1]} frames of +-2-frame wav2vec2 windows -> "
                           "tokens", plain["audio_proj"].inputs[0].shape[1], plain["audio_proj"], "audioproj", 6)])

    # 6. Audio encoders on one window of whole frames of 16 kHz audio
    for name, build in (("wavlm", lambda: build_wavlm(cfg.wavlm, seed=cfg.seed + 1)),
                        ("wav2vec2", lambda: build_wav2vec2(cfg.wav2vec2, seed=cfg.seed + 2))):
        nets[name] = Network(name, _on_device(build, device), [
            case(name, f"{w / FPS:.1f} s of 16 kHz audio -> {w} frames of features", w, plain[name], name, 7)])

    return [nets[n] for n in NETWORKS if n in names]  # in a fixed order, most important first


# ----------------------------------------------------------------------------------------------------------------
# Measuring one case
# ----------------------------------------------------------------------------------------------------------------
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter(display: bool = False):
    """FlopCounterMode that also counts the CPU flash-attention op (the stock registry knows the CUDA ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is not None:
        custom[cpu_op] = _sdpa_cpu_flops
    return FlopCounterMode(display=display, custom_mapping=custom)


@torch.no_grad()
def count_flops(module: nn.Module, case: Case, dtype: torch.dtype) -> Tuple[int, Dict[str, int]]:
    """(total FLOPs of one call, FLOPs per module name) from one eager call."""
    args, kwargs = case.make_inputs(dtype)
    counter = flop_counter()
    with counter:
        case.call(module, args, kwargs)
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module


def compare(out: torch.Tensor, ref: torch.Tensor) -> Dict[str, object]:
    """Accuracy of ``out`` against ``ref`` (both upcast to fp32): max abs, max abs / max |ref|, relative L2."""
    a, b = out.detach().float(), ref.detach().float()
    if a.shape != b.shape:
        return {"error": f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"}
    finite = bool(torch.isfinite(a).all())
    diff = (a - b).abs()
    ref_max = float(b.abs().max())
    ref_norm = float(b.norm())
    return {"finite": finite, "max_abs_diff": float(diff.max()), "ref_max_abs": ref_max,
            "max_rel_diff": float(diff.max()) / ref_max if ref_max > 0 else None,
            "rel_l2_diff": float(diff.norm()) / ref_norm if ref_norm > 0 else None}


def capture_graph(fn: Callable[[], torch.Tensor], device: torch.device) -> Tuple[Callable[[], None], torch.Tensor]:
    """Capture ``fn`` in a CUDA graph (warm-up on a side stream first, as torch.cuda.graphs requires).

    Returns (replay, static output): every replay rewrites the output tensor in place.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    return graph.replay, out


def _peak_mem_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # give the GPU memory of dropped networks and graphs back (slow gc on CPU: skip)
        gc.collect()
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 600 else text[:600] + " ..."


@dataclass
class Settings:
    device: torch.device
    dtypes: List[str]
    variants: List[str]  # of "eager", "channels_last", "graph", "compile", "compile_graph"
    warmup: int
    iters: int
    max_seconds: float  # per timed variant
    compile_mode: str
    peak: Optional[float]
    tolerance: float
    deadline: Optional[float]  # perf_counter time after which optional variants are skipped

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


def _throughput(stats: Dict[str, float], case: Case, flops: Optional[int], peak: Optional[float]) -> Dict[str, object]:
    seconds = stats["median_ms"] / 1e3
    out: Dict[str, object] = dict(stats)
    out["frames_per_s"] = case.frames / seconds if case.frames else None
    out["calls_per_s"] = 1.0 / seconds
    if flops:
        out["tflops"] = flops / seconds / 1e12
        out["mfu"] = out["tflops"] / peak if peak else None
    return out


def run_variant(variant: str, module: nn.Module, case: Case, dtype: torch.dtype, settings: Settings,
                compiled: Dict[str, nn.Module]) -> Tuple[Dict[str, object], torch.Tensor]:
    """Time one variant of one case; returns (stats, an output of the variant for the accuracy check)."""
    device = settings.device
    args, kwargs = case.make_inputs(dtype)
    extra: Dict[str, object] = {}
    run = functools.partial(case.call, module)  # (args, kwargs) -> output
    if variant == "channels_last":
        if "channels_last" not in compiled:
            compiled["channels_last"] = copy.deepcopy(module).to(memory_format=torch.channels_last)
        run = functools.partial(case.call, compiled["channels_last"])
        args = tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.ndim == 4
                     else a for a in args)
    if variant in ("compile", "compile_graph"):
        key = f"compile:{case.name}"  # the case's whole call is compiled (SMGA's CFG call is a method, not forward)
        if key not in compiled:
            compiled[key] = torch.compile(run, mode=settings.compile_mode, dynamic=False)
        run = compiled[key]
        t0 = time.perf_counter()
        with torch.no_grad():
            run(args, kwargs)  # the first call compiles
        synchronize(device)
        extra["first_call_s"] = time.perf_counter() - t0

    last: List[torch.Tensor] = []  # the latest output: the accuracy check needs no extra call

    def call() -> torch.Tensor:
        with torch.no_grad():
            out = run(args, kwargs)
        last[:] = [out]
        return out

    _reset_peak(device)
    if variant in ("graph", "compile_graph"):
        t0 = time.perf_counter()
        replay, out = capture_graph(call, device)
        extra["capture_s"] = time.perf_counter() - t0
        stats = time_call(replay, device, settings.warmup, settings.iters, settings.max_seconds)
        result = out.detach().clone()
    else:
        stats = time_call(call, device, settings.warmup, settings.iters, settings.max_seconds)
        result = last[0]
    stats.update(extra)
    stats["peak_mem_mb"] = _peak_mem_mb(device)
    return stats, result


def run_case(module: nn.Module, case: Case, dtype_name: str, settings: Settings, variants: Sequence[str],
             flops: Optional[int], compiled: Dict[str, nn.Module]) -> Tuple[Dict[str, object], Optional[torch.Tensor]]:
    """All variants of one case in one dtype: {variant: stats or {"error"/"skipped"}}, plus the eager output."""
    dtype = DTYPES[dtype_name]
    results: Dict[str, object] = {}
    eager_out = None
    for variant in variants:
        if variant in ("graph", "compile_graph") and (settings.device.type != "cuda" or not case.graphable):
            results[variant] = {"skipped": "needs CUDA and a call without host copies"}
            continue
        if variant in ("compile", "compile_graph") and not case.compilable:
            results[variant] = {"skipped": "not compiled: host-side audio preprocessing in the call"}
            continue
        if variant != "eager" and "error" in results.get("eager", {}):
            results[variant] = {"skipped": "eager call failed"}
            continue
        if variant != "eager" and settings.out_of_time():
            results[variant] = {"skipped": "time budget (--budget-s) spent"}
            continue
        try:
            stats, out = run_variant(variant, module, case, dtype, settings, compiled)
        except Exception as exc:  # a failing variant is a result too; keep measuring the others
            log.warning("%s %s %s failed: %s", case.name, dtype_name, variant, _error(exc))
            results[variant] = {"error": _error(exc)}
            _free(settings.device)
            continue
        stats = _throughput(stats, case, flops, settings.peak)
        if variant == "eager":
            eager_out = out
        elif eager_out is not None:
            stats["diff_vs_eager"] = compare(out, eager_out)
        results[variant] = stats
        log.info("%-20s %s %-13s median %8.3f ms  p90 %8.3f ms%s", case.name, dtype_name, variant, stats["median_ms"],
                 stats["p90_ms"], f"  {stats['tflops']:.1f} TFLOP/s" if stats.get("tflops") else "")
        del out
    eager = results.get("eager")
    if isinstance(eager, dict) and "median_ms" in eager:
        for variant, stats in results.items():
            if variant != "eager" and isinstance(stats, dict) and "median_ms" in stats:
                stats["speedup_vs_eager"] = eager["median_ms"] / stats["median_ms"]
    return results, eager_out


# ----------------------------------------------------------------------------------------------------------------
# UNet3D breakdown: where the time and the FLOPs go, by module kind
# ----------------------------------------------------------------------------------------------------------------
BREAKDOWN_KINDS: Tuple[Tuple[str, str], ...] = (
    ("resnet", r"\.resnets\.\d+$"),
    ("spatial_self_attn_with_bank", r"\.attentions\.\d+\.transformer_blocks\.0\.attn1$"),
    ("spatial_cross_attn_clip", r"\.attentions\.\d+\.transformer_blocks\.0\.attn2$"),
    ("spatial_ff", r"\.attentions\.\d+\.transformer_blocks\.0\.ff$"),
    ("spatial_norm_proj", r"\.attentions\.\d+\.(norm|proj_in|proj_out|transformer_blocks\.0\.norm\d)$"),
    ("mmhaa_self_attn", r"\.audio_modules\.\d+\.transformer_blocks\.0\.attn1$"),
    ("mmhaa_audio_cross_attn", r"\.audio_modules\.\d+\.transformer_blocks\.0\.attn2_\d$"),
    ("mmhaa_ff", r"\.audio_modules\.\d+\.transformer_blocks\.0\.ff$"),
    ("mmhaa_norm_proj_zeroconv", r"\.audio_modules\.\d+\.(norm|proj_in|proj_out|transformer_blocks\.0\.(norm\d|"
                                 r"zero_conv_\w+))$"),
    ("motion_attn", r"\.motion_modules\.\d+\.temporal_transformer\.transformer_blocks\.0\.attention_blocks\.\d$"),
    ("motion_ff", r"\.motion_modules\.\d+\.temporal_transformer\.transformer_blocks\.0\.ff$"),
    ("motion_norm_proj", r"\.motion_modules\.\d+\.temporal_transformer\.(norm|proj_in|proj_out|"
                         r"transformer_blocks\.0\.(norms\.\d|ff_norm))$"),
    ("down_up_sample", r"\.(downsamplers|upsamplers)\.0$"),
)


def _kind_of(name: str) -> Optional[str]:
    for kind, pattern in BREAKDOWN_KINDS:
        if re.search(pattern, "." + name):
            return kind
    return None


@torch.no_grad()
def breakdown(module: nn.Module, case: Case, dtype: torch.dtype, per_module_flops: Dict[str, int],
              device: torch.device, repeats: int = 3) -> Dict[str, object]:
    """Per module kind: GPU milliseconds (CUDA events around each leaf module, eager), FLOPs and TFLOP/s.

    Events add a little overhead; "other" is the call's total minus the kinds (reshapes, residual adds, mask
    multiplies, cat of the bank keys, conv_in/out, time embedding).
    """
    if device.type != "cuda":
        return {"skipped": "CUDA events only"}
    args, kwargs = case.make_inputs(dtype)
    marks: List[Tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    pending: Dict[int, torch.cuda.Event] = {}
    handles = []
    kinds: Dict[str, str] = {}
    for name, sub in module.named_modules():
        kind = _kind_of(name)
        if kind is None:
            continue
        kinds[name] = kind

        def pre(mod, _inp, key=id(sub)):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            pending[key] = ev

        def post(mod, _inp, _out, key=id(sub), kind=kind):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((kind, pending.pop(key), ev))

        handles += [sub.register_forward_pre_hook(pre), sub.register_forward_hook(post)]
    totals: Dict[str, float] = {k: 0.0 for k, _ in BREAKDOWN_KINDS}
    whole = 0.0
    try:
        case.call(module, args, kwargs)  # warm
        for _ in range(repeats):
            marks.clear()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.call(module, args, kwargs)
            end.record()
            torch.cuda.synchronize(device)
            whole += start.elapsed_time(end) / repeats
            for kind, a, b in marks:
                totals[kind] += a.elapsed_time(b) / repeats
    finally:
        for h in handles:
            h.remove()
    flops: Dict[str, int] = {k: 0 for k, _ in BREAKDOWN_KINDS}
    for name, count in per_module_flops.items():
        kind = _kind_of(name.split(".", 1)[1]) if "." in name else None
        if kind is not None:
            flops[kind] += count
    total_flops = per_module_flops.get("Global", sum(flops.values()))
    rows = {}
    for kind, _ in BREAKDOWN_KINDS:
        ms = totals[kind]
        rows[kind] = {"ms": ms, "share": ms / whole if whole else None, "gflops": flops[kind] / 1e9,
                      "tflops": flops[kind] / (ms / 1e3) / 1e12 if ms > 0 else None,
                      "modules": sum(1 for k in kinds.values() if k == kind)}
    other_ms = whole - sum(totals.values())
    other_flops = total_flops - sum(flops.values())
    rows["other"] = {"ms": other_ms, "share": other_ms / whole if whole else None, "gflops": other_flops / 1e9,
                     "tflops": None, "modules": None}
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "total_ms_with_events": whole,
            "kinds": rows}


@torch.no_grad()
def profile_kernels(module: nn.Module, case: Case, dtype: torch.dtype, device: torch.device,
                    top: int = 30) -> Dict[str, object]:
    """torch.profiler over one eager call: the top GPU kernels and the attention kernels SDPA picked."""
    from torch.profiler import ProfilerActivity, profile

    args, kwargs = case.make_inputs(dtype)
    case.call(module, args, kwargs)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        case.call(module, args, kwargs)
        synchronize(device)
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0.0)
        if dev_us and getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type):
            rows.append({"name": ev.key[:200], "ms": dev_us / 1e3, "count": ev.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    attn = [r for r in rows if re.search(r"flash|fmha|attention|sdpa|softmax", r["name"], re.I)]
    families = {"attention": r"flash|fmha|attention", "conv": r"conv|fprop|dgrad|implicit",  # first match wins
                "gemm": r"gemm|nvjet|xmma|cutlass|matmul", "norm": r"norm"}
    fam_ms = {k: 0.0 for k in families}
    fam_ms["other"] = 0.0
    for r in rows:
        for k, pat in families.items():
            if re.search(pat, r["name"], re.I):
                fam_ms[k] += r["ms"]
                break
        else:
            fam_ms["other"] += r["ms"]
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "kernel_ms_total": total,
            "families_ms": fam_ms, "top_kernels": rows[:top], "attention_kernels": attn[:15]}


@torch.no_grad()
def sdpa_probe(cfg: MMGTConfig, chunk: int, device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """Time each SDPA backend at the UNet3D's attention shapes (batch 1, first two levels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    u, lat = cfg.unet, cfg.latent_size
    heads = u.attention_heads
    shapes = {}
    for level in range(min(2, len(u.block_out_channels))):
        side = max(1, lat // 2**level)
        ch, hw = u.block_out_channels[level], side * side
        d = ch // heads
        shapes[f"bank_self_attn_l{level}"] = ((chunk, heads, hw, d), (chunk, heads, 2 * hw, d))
        shapes[f"mmhaa_self_attn_l{level}"] = ((chunk, heads, hw, d), (chunk, heads, hw, d))
        shapes[f"mmhaa_audio_attn_l{level}"] = ((chunk, heads, hw, d),
                                                (chunk, heads, cfg.audio_proj.context_tokens, d))
        shapes[f"motion_attn_l{level}"] = ((hw, u.motion_heads, chunk, ch // u.motion_heads),) * 2
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None), "math": SDPBackend.MATH}
    out: Dict[str, object] = {}
    g = _gen(device, 9)
    for name, (qs, ks) in shapes.items():
        q = torch.randn(*qs, generator=g, device=device, dtype=dtype)
        k = torch.randn(*ks, generator=g, device=device, dtype=dtype)
        v = torch.randn(*ks, generator=g, device=device, dtype=dtype)
        row: Dict[str, object] = {"q": list(qs), "kv": list(ks)}
        flops = 4 * qs[0] * qs[1] * qs[2] * ks[2] * qs[3]
        for bname, backend in [("default", None)] + list(backends.items()):
            if bname != "default" and backend is None:
                continue
            ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            try:
                with ctx:
                    stats = time_call(lambda: F.scaled_dot_product_attention(q, k, v), device, 2, 10, 5.0)
                row[bname] = {"median_ms": stats["median_ms"], "tflops": flops / (stats["median_ms"] / 1e3) / 1e12}
            except Exception as exc:  # backend not available for this shape/dtype
                row[bname] = {"error": _error(exc)[:200]}
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def run_network(net: Network, settings: Settings, analyse: bool, profile: bool, cfg: MMGTConfig,
                chunk: int) -> Dict[str, object]:
    device = settings.device
    t0 = time.perf_counter()
    module = net.build()
    entry: Dict[str, object] = {"note": net.note, "build_s": time.perf_counter() - t0,
                                "params": sum(p.numel() for p in module.parameters()), "cases": {}}
    log.info("%s: %.1f M parameters, built in %.1f s", net.name, entry["params"] / 1e6, entry["build_s"])
    variants_dtype = "fp16" if "fp16" in settings.dtypes else settings.dtypes[0]
    cases_out: Dict[str, Dict[str, object]] = {c.name: {"unit": c.unit, "frames": c.frames, "shapes": c.shapes,
                                                         "runs": {}} for c in net.cases}
    refs: Dict[str, torch.Tensor] = {}
    per_module_flops: Dict[str, Dict[str, int]] = {}
    # fp32 first (the reference), then the module is cast in place to fp16: one copy of the weights at a time
    for dtype_name in sorted(settings.dtypes, key=lambda d: d != "fp32"):
        dtype = DTYPES[dtype_name]
        module.to(dtype)
        compiled: Dict[str, nn.Module] = {}
        for case in net.cases:
            out = cases_out[case.name]
            if "flops" not in out:
                try:
                    out["flops"], per_module_flops[case.name] = count_flops(module, case, dtype)
                    out["gflops_per_frame"] = out["flops"] / case.frames / 1e9 if case.frames else None
                except Exception as exc:
                    out["flops"], out["flops_error"] = None, _error(exc)
            variants = settings.variants if dtype_name == variants_dtype else ["eager"]
            variants = [v for v in variants if v != "channels_last" or net.conv]
            runs, eager_out = run_case(module, case, dtype_name, settings, variants, out.get("flops"), compiled)
            out["runs"][dtype_name] = runs
            if eager_out is not None:
                if dtype_name == "fp32":
                    refs[case.name] = eager_out
                elif case.name in refs:
                    acc = compare(eager_out, refs[case.name])
                    acc["tolerance_rel_l2"] = settings.tolerance
                    acc["match"] = bool(acc.get("finite") and acc.get("rel_l2_diff") is not None
                                        and acc["rel_l2_diff"] <= settings.tolerance)
                    out[f"{dtype_name}_vs_fp32"] = acc
            if "fp16" in out["runs"] and "fp32" in out["runs"]:
                e16, e32 = out["runs"]["fp16"].get("eager", {}), out["runs"]["fp32"].get("eager", {})
                if "median_ms" in e16 and "median_ms" in e32:
                    out["fp16_speedup_vs_fp32_eager"] = e32["median_ms"] / e16["median_ms"]
        del compiled
        _free(device)
    # A network that fails in fp16 (SMGA's time embedding, say) gets its variants in fp32, on a fresh fp32 build
    failed = [c for c in net.cases if variants_dtype == "fp16" and "fp32" in settings.dtypes
              and "error" in cases_out[c.name]["runs"].get("fp16", {}).get("eager", {})]
    if failed and len(settings.variants) > 1:
        log.info("%s: fp16 failed, timing the variants in fp32", net.name)
        del module
        _free(device)
        module = net.build()
        compiled = {}
        for case in failed:
            variants = [v for v in settings.variants if v != "channels_last" or net.conv]
            runs, _ = run_case(module, case, "fp32", settings, variants, cases_out[case.name].get("flops"), compiled)
            cases_out[case.name]["runs"]["fp32"] = runs
            cases_out[case.name]["variants_dtype"] = "fp32 (fp16 eager failed)"
        del compiled
        _free(device)
        variants_dtype = "fp32"
    # Analysis of the denoiser step (CUDA): where the time goes
    if analyse and net.name == "unet3d" and device.type == "cuda":
        case = net.cases[0]
        dtype = DTYPES[variants_dtype]
        module.to(dtype)
        for label, fn in (("breakdown", lambda: breakdown(module, case, dtype, per_module_flops.get(case.name, {}),
                                                          device)),
                          ("profile", (lambda: profile_kernels(module, case, dtype, device)) if profile else None),
                          ("sdpa_backends", lambda: sdpa_probe(cfg, chunk, device, dtype))):
            if fn is None:
                continue
            try:
                entry[label] = fn()
            except Exception as exc:
                entry[label] = {"error": _error(exc)}
    entry["cases"] = cases_out
    entry["total_s"] = time.perf_counter() - t0
    module = refs = None  # drop the weights before freeing the cache
    _free(device)
    return entry


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_networks", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (mmgt: release sizes; tiny: toy sizes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                   help="dtypes to time (default fp16 fp32 on CUDA, fp32 on CPU); fp32 (TF32 off) is the accuracy "
                        "reference for fp16")
    p.add_argument("--chunk", type=int, default=16, help="render-chunk frames C (<= motion_max_frames)")
    p.add_argument("--networks", default=",".join(NETWORKS), help=f"comma list of {', '.join(NETWORKS)}")
    p.add_argument("--compile", action="store_true", help="add torch.compile variants")
    p.add_argument("--compile-mode", default="default",
                   help='torch.compile mode: "default", "max-autotune-no-cudagraphs", ...')
    p.add_argument("--cuda-graphs", action="store_true", help="add CUDA-graph variants (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="add a channels_last eager variant (conv networks)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 is much faster on a busy shared CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="cap on the timed calls of one variant")
    p.add_argument("--budget-s", type=float, default=None, help="after this many seconds only eager runs are done")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense fp16 peak for MFU (default: by GPU name)")
    p.add_argument("--tolerance", type=float, default=2e-2, help="fp16-vs-fp32 relative L2 tolerance")
    p.add_argument("--no-analysis", action="store_true", help="skip the UNet3D breakdown and SDPA probe")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler kernel table of the UNet3D step")
    p.add_argument("--name", default=None, help="result name (default networks-<preset>)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/<name>-<device>-<date>.json)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    cfg = get_preset(args.preset)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_networks: --device cuda but torch sees no CUDA device")
    if not 1 <= args.chunk <= cfg.unet.motion_max_frames:
        raise SystemExit(f"bench_networks: --chunk {args.chunk} outside 1..{cfg.unet.motion_max_frames}")
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise SystemExit(f"bench_networks: unknown networks {unknown}; known: {', '.join(NETWORKS)}")
    if device.type == "cuda":
        if device.index is None:  # "cuda" -> "cuda:N": events, graphs and memory stats want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    # fp32 is the accuracy reference: no TF32 in matmuls or cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest conv algorithms
    torch.manual_seed(cfg.seed)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"bench_networks: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    variants = ["eager"]
    if args.channels_last:
        variants.append("channels_last")
    if args.cuda_graphs:
        variants.append("graph")
    if args.compile:
        variants.append("compile")
        if args.cuda_graphs:
            variants.append("compile_graph")
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    dtypes = args.dtype or (["fp16", "fp32"] if cuda else ["fp32"])
    settings = Settings(device=device, dtypes=list(dict.fromkeys(dtypes)), variants=variants,
                        warmup=args.warmup if args.warmup is not None else (3 if cuda else 1),
                        iters=args.iters if args.iters is not None else (20 if cuda else 3),
                        max_seconds=args.max_seconds, compile_mode=args.compile_mode, peak=peak,
                        tolerance=args.tolerance,
                        deadline=start + args.budget_s if args.budget_s is not None else None)
    out_path = args.out or result_path(args.name or f"networks-{cfg.name}", device)
    payload: Dict[str, object] = {
        "benchmark": "bench_networks",
        "command": " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:])),
        "preset": cfg.name, "resolution": cfg.resolution, "latent_size": cfg.latent_size, "chunk": args.chunk,
        "weights": "random (speed does not depend on the values)",
        "machine": machine_info(device),
        "settings": {"dtypes": settings.dtypes, "variants": variants, "variants_dtype":
                     "fp16" if "fp16" in settings.dtypes else settings.dtypes[0], "warmup": settings.warmup,
                     "iters": settings.iters, "max_seconds_per_variant": settings.max_seconds,
                     "compile_mode": args.compile_mode if args.compile else None, "tf32": False,
                     "cudnn_benchmark": True, "peak_fp16_tflops": peak, "peak_source": peak_source,
                     "tolerance_rel_l2": args.tolerance, "budget_s": args.budget_s},
        "networks": {},
    }
    for net in build_networks(cfg, args.chunk, device, names):
        log.info("=== %s", net.name)
        try:
            payload["networks"][net.name] = run_network(net, settings, not args.no_analysis, args.profile, cfg,
                                                        args.chunk)
        except Exception as exc:  # e.g. out of memory while building: record and go on with the next network
            log.warning("%s failed: %s", net.name, _error(exc))
            payload["networks"][net.name] = {"error": _error(exc)}
            _free(device)
        payload["elapsed_s"] = time.perf_counter() - start
        write_json(payload, out_path)
    payload["json"] = str(out_path)
    return payload


def summary_lines(payload: Dict[str, object]) -> List[str]:
    """A short table: per case and variant, median ms, frames/s, TFLOP/s, MFU, and fp16-vs-fp32 error."""
    lines = [f"{'case':<20} {'dtype':<5} {'variant':<14} {'median ms':>10} {'p90 ms':>9} {'frames/s':>9} "
             f"{'TFLOP/s':>8} {'MFU':>6} {'x eager':>8}"]
    for net in payload["networks"].values():
        if "error" in net:
            continue
        for name, case in net["cases"].items():
            for dtype_name, runs in case["runs"].items():
                for variant, st in runs.items():
                    if "median_ms" not in st:
                        lines.append(f"{name:<20} {dtype_name:<5} {variant:<14} "
                                     f"{(st.get('error') or st.get('skipped', ''))[:60]}")
                        continue
                    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
                    lines.append(f"{name:<20} {dtype_name:<5} {variant:<14} {st['median_ms']:>10.3f} "
                                 f"{st['p90_ms']:>9.3f} {fmt(st.get('frames_per_s'), '9.1f'):>9} "
                                 f"{fmt(st.get('tflops'), '8.2f'):>8} {fmt(st.get('mfu'), '6.1%'):>6} "
                                 f"{fmt(st.get('speedup_vs_eager'), '8.2f'):>8}")
            acc = case.get("fp16_vs_fp32")
            if acc and "rel_l2_diff" in acc:
                lines.append(f"{name:<20} fp16 vs fp32: rel L2 {acc['rel_l2_diff']:.2e}, max abs "
                             f"{acc['max_abs_diff']:.2e}, finite {acc['finite']}, match {acc['match']}")
    return lines


if __name__ == "__main__":
    result = main()
    print("\n".join(summary_lines(result)))
    print(f"wrote {result['json']}")
