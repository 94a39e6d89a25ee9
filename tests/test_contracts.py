"""Each network's contract is declared once (beside the network, listed in mmgt/contracts.py) and everything that
names or shapes its tensors reads that declaration: the exported artifact's manifest, the feeds the engine hands a
backend at run time, and the benchmark's inputs."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from engine.runner import Runner
from engine.settings import OFFLINE
from export.cli import key_fields
from export.manifest import read_manifest
from mmgt import pipeline as P
from mmgt.config import TINY
from mmgt.contract import Shapes
from mmgt.contracts import NETWORKS, network_contracts
from tests.conftest import EXPORT_CHUNK

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

# the benchmark's cases of each network (bench_networks names its cases by what it times)
BENCH_CASES = {"denoising_unet": ("unet3d", "unet3d_step_b1"), "vae_decoder": ("vae_decode", "vae_decode"),
               "smga_denoise": ("smga", "smga_step"), "smga_condition": ("smga", "smga_condition"),
               "reference_unet": ("reference_net", "reference_net"), "pose_guider": ("pose_guider", "pose_guider"),
               "audio_proj": ("audio_proj", "audio_proj"), "wavlm": ("wavlm", "wavlm"),
               "wav2vec2": ("wav2vec2", "wav2vec2"), "image_encoder": ("image_encoder", "image_encoder"),
               "vae_encoder": ("vae_encode", "vae_encode")}
SETTINGS = OFFLINE.with_(chunk=EXPORT_CHUNK, overlap=2, hop=40)


class Recorder:
    """An executor that notes the names, shapes and dtypes of every call's feeds and outputs, then runs."""

    def __init__(self, executor, log):
        self.executor, self.log = executor, log

    def __call__(self, feeds):
        out = self.executor(feeds)
        self.log.append(({k: (tuple(v.shape), v.dtype) for k, v in feeds.items()}, tuple(out)))
        return out


@pytest.fixture(scope="module")
def contracts():
    return network_contracts(TINY, Shapes.from_settings(TINY, SETTINGS))


@pytest.fixture(scope="module")
def run_calls(tiny_models, portrait, speech):
    """Every network call of a real run (the avatar, then 4 s through the runner), recorded per network."""
    shaped = dataclasses.replace(tiny_models, shapes=Shapes.from_settings(TINY, SETTINGS))
    calls = {name: [] for name in shaped.calls}
    recorded = dataclasses.replace(shaped, executors={n: Recorder(ex, calls[n]) for n, ex in shaped.calls.items()})
    avatar = P.prepare_avatar(recorded, portrait)
    from engine.sinks import NullSink

    Runner(recorded, avatar, SETTINGS).run(speech[: 4 * 16000], NullSink())
    return calls


def test_every_network_has_one_contract(contracts):
    assert tuple(contracts) == NETWORKS
    for name, c in contracts.items():
        assert c.name == name and len(set(c.input_names)) == len(c.inputs) and c.outputs


@pytest.mark.parametrize("network", NETWORKS)
def test_the_engine_feeds_each_backend_what_the_contract_declares(network, contracts, run_calls):
    """At run time every network is called by name with exactly its contract's inputs (shapes within the
    declared ranges, dtypes as declared for a fp32 model set) and answers with exactly its outputs."""
    c = contracts[network]
    assert run_calls[network], f"{network} was never called in a render"
    for feeds, outputs in run_calls[network]:
        assert tuple(feeds) == c.input_names or set(feeds) == set(c.input_names)
        assert outputs == c.output_names
        for spec in c.inputs:
            shape, dtype = feeds[spec.name]
            assert spec.fits(shape) is None, spec.fits(shape)
            assert str(dtype) == f"torch.{spec.resolved_dtype('fp32')}", (network, spec.name, dtype)


@pytest.mark.parametrize("network", NETWORKS)
def test_the_exported_manifest_is_the_contract(network, tiny_exported, contracts):
    """The artifact's recorded io (what onnxruntime and TensorRT bind by name) is the contract's, field for field,
    and so is the cache key's description of the network."""
    out = tiny_exported[0]
    (directory,) = [p for p in (out / network).iterdir() if p.is_dir() and not p.name.startswith(".")]
    manifest = read_manifest(directory)
    c = contracts[network]
    assert manifest["key_fields"]["io"] == c.io_json("fp32")
    fields = key_fields(c, TINY, Shapes.from_settings(TINY, SETTINGS), "w", "onnx", "fp32", 17)
    assert fields["io"] == c.io_json("fp32") and fields["contract_version"] == c.version


@pytest.mark.parametrize("network", NETWORKS)
def test_the_benchmark_times_the_contract(network):
    """bench_networks' cases take their inputs from the contract (names, shapes and the torch call)."""
    from benchmarks import bench_networks as bn

    bench_net, case_name = BENCH_CASES[network]
    cfg_chunk = EXPORT_CHUNK
    (net,) = bn.build_networks(TINY, cfg_chunk, torch.device("cpu"), [bench_net])
    case = {c.name: c for c in net.cases}[case_name]
    guided = case_name.endswith("_cfg") or case_name in ("smga_condition",)
    shapes = Shapes.from_config(TINY, chunk=cfg_chunk, guidance=3.5 if guided else 1.0,
                                smga_guidance=TINY.smga.guidance if guided else 1.0)
    c = network_contracts(TINY, shapes)[network]
    assert case.shapes == {t.name: list(t.shape) for t in c.inputs}
    args, _ = case.make_inputs(torch.float32)
    assert [tuple(a.shape) for a in args] == [t.shape for t in c.inputs]
    module = net.build()
    out = case.call(module, args, {})
    assert tuple(out.shape) == c.outputs[-1].shape or c.outputs[-1].fits(tuple(out.shape)) is None
