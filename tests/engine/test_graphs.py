"""StaticGraph: the buffer protocol of CUDA-graph replay (on the CPU without capture), and the accelerate() options."""
import dataclasses

import numpy as np
import pytest
import torch

from engine.backends import BackendUnavailable, accelerate
from engine.backends.graphs import GraphError, StaticGraph
from mmgt import pipeline as P
from mmgt.contract import Shapes


def _affine(x, scale: float, extra=None):
    out = {"y": x * scale}
    if extra is not None:
        out["z"] = [extra["a"] + 1, extra["b"][0] * 2]
    return out


def test_results_equal_the_function_for_new_inputs_and_buffers_are_reused():
    g = StaticGraph(_affine, name="affine", capture=False)
    for seed in range(3):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(g(x, 2.0)["y"], x * 2.0, rtol=0, atol=0)
    assert g.signatures == 1, "same shapes and constants must reuse one signature"


def test_shapes_dtypes_and_constants_make_new_signatures():
    g = StaticGraph(_affine, capture=False)
    x = torch.ones(2, 2)
    g(x, 2.0)
    g(x, 3.0)  # a constant is baked into a graph: a new value is a new signature, never a stale replay
    g(torch.ones(3, 2), 2.0)
    g(x.double(), 2.0)
    assert g.signatures == 4
    assert torch.equal(g(x, 3.0)["y"], torch.full((2, 2), 3.0))
    assert g.signatures == 4


def test_nested_arguments_keywords_and_outputs():
    g = StaticGraph(_affine, capture=False)
    x = torch.arange(6.0).reshape(2, 3)
    extra = {"a": torch.ones(2), "b": [torch.full((3,), 5.0)]}
    out = g(x, 1.5, extra=extra)
    assert torch.equal(out["z"][0], torch.full((2,), 2.0)) and torch.equal(out["z"][1], torch.full((3,), 10.0))
    extra2 = {"a": torch.zeros(2), "b": [torch.ones(3)]}
    out2 = g(x, 1.5, extra=extra2)
    assert torch.equal(out2["z"][0], torch.ones(2)) and torch.equal(out2["z"][1], torch.full((3,), 2.0))
    assert g.signatures == 1


def test_outputs_are_copies_not_the_static_buffers():
    g = StaticGraph(_affine, capture=False)
    first = g(torch.ones(3), 2.0)["y"]
    second = g(torch.full((3,), 5.0), 2.0)["y"]
    assert torch.equal(first, torch.full((3,), 2.0)), "a later call changed an earlier result"
    second.add_(100)  # the caller may write into what it got
    assert torch.equal(g(torch.full((3,), 5.0), 2.0)["y"], torch.full((3,), 10.0))


def test_the_callers_tensor_is_not_aliased():
    """The function sees the static buffer, not the caller's tensor: an in-place op inside must not leak out."""
    def inplace(x):
        return x.mul_(2)

    g = StaticGraph(inplace, capture=False)
    x = torch.ones(2)
    assert torch.equal(g(x), torch.full((2,), 2.0))
    assert torch.equal(x, torch.ones(2))


def test_bad_arguments_and_limits_are_refused_by_name():
    g = StaticGraph(lambda x, f: x, name="denoiser step", capture=False)
    with pytest.raises(GraphError, match="denoiser step: cannot graph an argument of type ndarray"):
        g(torch.ones(1), np.ones(1))
    with pytest.raises(GraphError, match="need every input tensor on a CUDA device"):
        StaticGraph(lambda x: x, name="step", capture=True)(torch.ones(1))
    small = StaticGraph(lambda x: x, name="step", capture=False, max_signatures=2)
    small(torch.ones(1))
    small(torch.ones(2))
    with pytest.raises(GraphError, match="more than 2 input signatures"):
        small(torch.ones(3))


def test_concurrent_callers_get_their_own_results(in_threads):
    g = StaticGraph(lambda x: x * 3 + 1, capture=False)
    results = {}

    def work(i):
        for k in range(20):
            results[(i, k)] = g(torch.full((64,), float(i * 100 + k)))

    assert not in_threads(work, 4)
    for (i, k), out in results.items():
        assert torch.equal(out, torch.full((64,), float(i * 100 + k) * 3 + 1))


def test_graphed_smga_step_samples_the_same_poses(tiny_models):
    """The SMGA step as the engine replays it (a StaticGraph around the contract's call, capture off on the CPU):
    same poses, one signature per run layout."""
    from engine.backends.torch_backend import TorchExecutor

    step = TorchExecutor(tiny_models.contracts["smga_denoise"], tiny_models)
    graphed = StaticGraph(step._positional, name="smga step", capture=False)
    step.graph = graphed  # what cuda_graph=True does on a GPU, with capture off here
    models = dataclasses.replace(tiny_models, executors={"smga_denoise": step})
    w = tiny_models.cfg.smga.window
    cond = torch.randn(w, tiny_models.cfg.smga.audio_dim, generator=torch.Generator().manual_seed(0))
    init = np.zeros(402, np.float32)
    ref = P.generate_poses(tiny_models, cond, init, 3, 2.0, torch.Generator().manual_seed(1))
    out = P.generate_poses(models, cond, init, 3, 2.0, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(out, ref)
    assert graphed.signatures == 1


def test_accelerate_without_options_is_the_same_models_and_graphs_need_cuda(tiny_models):
    assert accelerate(tiny_models) is tiny_models
    with pytest.raises(BackendUnavailable, match="CUDA graphs need a CUDA device"):
        accelerate(tiny_models, cuda_graphs=True)


def test_fixed_batch_decoder_matches_the_vae(tiny_models):
    """The accelerated decoder's shape: every call has DECODE_FRAMES_PER_CALL frames (the last one padded), and the
    frames equal the plain decoder's."""
    from engine.backends import DECODE_FRAMES_PER_CALL
    from engine.backends.torch_backend import FixedFrames

    plain = tiny_models.calls["vae_decoder"]
    seen = []

    def spy(feeds):
        seen.append(tuple(feeds["latents"].shape))
        return plain(feeds)

    models = dataclasses.replace(tiny_models, executors={
        "vae_decoder": FixedFrames(spy, DECODE_FRAMES_PER_CALL, input_name="latents", axis=0)})
    side = tiny_models.cfg.latent_size
    lat = torch.randn(1, 4, 6, side, side, generator=torch.Generator().manual_seed(0))
    ref, got = P.decode(tiny_models, lat), P.decode(models, lat)
    assert got.shape == ref.shape == (6, tiny_models.cfg.resolution, tiny_models.cfg.resolution, 3)
    assert np.array_equal(got, ref)
    assert seen == [(DECODE_FRAMES_PER_CALL, 4, side, side)] * 2  # 6 frames: 4 + (2 padded to 4)


def test_accelerate_replaces_the_calls_of_the_decoder_in_use(tiny_models, tiny_avatar, portrait):
    """--compile wraps the denoiser and the decoder the run decodes with (the light one when set); nothing is
    compiled until the first call, and the avatar (VAE encoder, ReferenceNet) is prepared exactly as before."""
    from mmgt.vae import build_tiny_decoder

    fast = accelerate(tiny_models, compile=True)
    assert fast.backends()["denoising_unet"] == "torch+compile" and fast.backends()["vae_decoder"] == "torch+compile"
    assert fast.backends()["reference_unet"] == "torch" and fast.vae is tiny_models.vae  # modules are shared
    avatar = P.prepare_avatar(fast, portrait)
    assert torch.equal(avatar.ref_latent, tiny_avatar.ref_latent)
    assert all(torch.equal(a, b) for a, b in zip(avatar.bank, tiny_avatar.bank))
    light = dataclasses.replace(tiny_models, decoder=build_tiny_decoder(tiny_models.cfg.vae, channels=16, seed=1))
    fast = accelerate(light, compile=True)
    assert fast.calls["vae_decoder"].executor.module.vae is light.decoder  # the light decoder is the one compiled


@pytest.mark.slow
def test_compiled_runner_matches_eager_without_graph_breaks(tiny_models, tiny_avatar, speech, collecting_sink):
    """--compile end to end on the CPU (inductor, ~2 min on two cores): the denoiser and the decoder compile
    whole, with no graph break (each break would split the GPU graph and cost a launch gap), and the frames equal
    the eager run's up to one level."""
    from torch._dynamo.utils import counters

    from engine.runner import Runner
    from engine.settings import OFFLINE

    settings = OFFLINE.with_(hop=40, chunk=12, overlap=4)
    audio = speech[: 2 * 16000]
    eager, compiled = collecting_sink(), collecting_sink()
    Runner(tiny_models, tiny_avatar, settings).run(audio, eager)
    counters.clear()
    shaped = dataclasses.replace(tiny_models, shapes=Shapes.from_settings(tiny_models.cfg, settings))
    runner = Runner(accelerate(shaped, compile=True), tiny_avatar, settings)
    runner.warm_up()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    runner.run(audio, compiled)
    a, b = eager.video().astype(int), compiled.video().astype(int)
    assert a.shape == b.shape == (50, tiny_models.cfg.resolution, tiny_models.cfg.resolution, 3)
    assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.01
