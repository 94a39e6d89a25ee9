"""Tier 2: GPU numerics of the engine (skipped without CUDA). fp16 against fp32, compiled and CUDA-graphed
against eager."""
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def chunk_case(portrait, speech):
    from mmgt import pipeline as P
    from mmgt.config import TINY

    def run(dtype, compile_unet=False, cuda_graphs=False):
        from engine.backends import accelerate
        from mmgt.contract import Shapes

        shapes = Shapes.from_config(TINY, chunk=12, guidance=2.0)
        models = P.build_models(TINY, device="cuda", dtype=dtype, shapes=shapes)
        models = accelerate(models, compile=compile_unet, cuda_graphs=cuda_graphs)
        avatar = P.prepare_avatar(models, portrait)
        kps = np.repeat(avatar.init_pose[None], 12, axis=0)
        frames, masks = P.pose_conditions(TINY, kps)
        tokens = P.audio_tokens(models, speech[: 12 * 640], 12)
        chunk = P.StageIIChunk(index=0, first_frame=0, pose_frames=frames, masks=P.unet_masks(TINY, masks),
                               audio_tokens=tokens, emit_from=0, emit_to=12)
        lat = P.render_chunk(models, avatar, chunk, steps=4, guidance=2.0, seed=0).latents
        return lat.float().cpu(), P.decode(models, lat)

    return run


def test_fp16_matches_fp32(chunk_case):
    lat32, img32 = chunk_case(torch.float32)
    lat16, img16 = chunk_case(torch.float16)
    rel = (lat16 - lat32).norm() / lat32.norm()
    assert rel < 2e-2, float(rel)
    assert np.abs(img16.astype(int) - img32).mean() < 2.0


def test_compiled_denoiser_matches_eager(chunk_case):
    lat, _ = chunk_case(torch.float16)
    lat_c, _ = chunk_case(torch.float16, compile_unet=True)
    assert ((lat_c - lat).norm() / lat.norm()) < 1e-2


def test_cuda_graph_denoiser_matches_eager(chunk_case):
    """The same kernels replayed: equal up to the reordering cuBLAS may pick between runs."""
    lat, _ = chunk_case(torch.float16)
    lat_g, _ = chunk_case(torch.float16, cuda_graphs=True)
    assert ((lat_g - lat).norm() / lat.norm()) < 1e-3


def test_captured_graph_replays_new_inputs():
    from engine.backends.graphs import StaticGraph
    from mmgt.config import TINY
    from mmgt.smga import build_smga

    smga = build_smga(TINY).cuda()
    g = StaticGraph(smga.guided_denoise, name="smga step", capture=True)
    w, d = TINY.smga.window, TINY.smga.latent_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for _ in range(3):  # every call: fresh inputs through the same captured graph
            x = torch.randn(1, w, 402, device="cuda", generator=gen)
            t = torch.randint(0, 1000, (1,), device="cuda", generator=gen)
            pose = torch.rand(1, 402, device="cuda", generator=gen)
            tok = torch.randn(2, w, d, device="cuda", generator=gen)
            hid = torch.randn(2, d, device="cuda", generator=gen)
            torch.testing.assert_close(g(x, t, pose, tok, hid, 2.0), smga.guided_denoise(x, t, pose, tok, hid, 2.0),
                                       rtol=1e-4, atol=1e-4)
    assert g.signatures == 1


def test_runner_with_cuda_graphs_matches_eager(portrait, speech, collecting_sink):
    """The whole runner (Stage I SMGA graph on its stream, graphed denoiser, decode worker on its stream)."""
    from engine.backends import accelerate
    from engine.runner import Runner
    from engine.settings import OFFLINE
    from mmgt import pipeline as P
    from mmgt.config import TINY

    from mmgt.contract import Shapes

    settings = OFFLINE.with_(hop=40, chunk=12, overlap=4, steps=3, smga_steps=4)
    models = P.build_models(TINY, device="cuda", dtype=torch.float32, shapes=Shapes.from_settings(TINY, settings))
    avatar = P.prepare_avatar(models, portrait)
    eager, graphed = collecting_sink(), collecting_sink()
    Runner(models, avatar, settings).run(speech[: 64 * 640], eager)
    runner = Runner(accelerate(models, cuda_graphs=True), avatar, settings)
    runner.warm_up()
    runner.run(speech[: 64 * 640], graphed)
    a, b = eager.video().astype(int), graphed.video().astype(int)
    assert a.shape == b.shape == (64, TINY.resolution, TINY.resolution, 3)
    assert np.abs(a - b).mean() < 0.5


def test_one_graph_shared_by_threads_on_their_own_streams(in_threads):
    """Streaming sessions share the model set: two threads, each on its own CUDA stream, replay one graph with
    their own inputs; every result is its own (the next call waits for the previous replay on the other stream)."""
    from engine.backends.graphs import StaticGraph

    g = StaticGraph(lambda x: (x @ x.T).sum(dim=1), name="shared", capture=True)  # long enough to overlap
    bad = []

    def work(i):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for k in range(10):
                v = float(i * 10 + k + 1) / 64
                out = g(torch.full((2048, 2048), v, device="cuda"))
                if not torch.allclose(out, torch.full((2048,), v * v * 2048 * 2048, device="cuda"), rtol=1e-3):
                    bad.append((i, k))

    assert not in_threads(work, 2)
    assert not bad and g.signatures == 1
