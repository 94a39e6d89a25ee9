"""Denoising UNet3D (and its motion modules): release key layout, shapes, determinism, the per-frame SD1.5 path
against diffusers' UNet2DConditionModel, reference-bank reading and CFG rows, attention backends, ONNX export."""
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from mmgt.attention import ReferenceRead, set_attention_backend
from mmgt.config import MMGT, TINY, UNetConfig
from mmgt.mmhaa import MMHAA, AudioTransformerBlock
from mmgt.motion_module import MotionModule
from mmgt.unet3d import DenoiserStep, UNet3D, audio_mask_levels, reference_bank_layout

CFG = TINY.unet
B, F, SIDE, AUDIO_TOKENS = 2, 3, 8, 4


def randomize_zero_init(model: torch.nn.Module, seed: int = 1) -> None:
    """Give zero-initialised layers (motion proj_out, MM-HAA zero convs) random weights so their paths matter."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for m in model.modules():
        if isinstance(m, MotionModule):
            layers.append(m.temporal_transformer.proj_out)
        elif isinstance(m, AudioTransformerBlock):
            layers += [m.zero_conv_full, m.zero_conv_face, m.zero_conv_lip]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.1)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)


def make_unet(seed: int = 0, randomize: bool = True, cfg: UNetConfig = CFG) -> UNet3D:
    torch.manual_seed(seed)
    model = UNet3D(cfg).eval()
    if randomize:
        randomize_zero_init(model)
    return model


def make_inputs(batch: int = B, frames: int = F, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, CFG.in_channels, frames, SIDE, SIDE, generator=gen)
    context = torch.randn(batch, 1, CFG.cross_attention_dim, generator=gen)
    pose = torch.randn(batch, CFG.block_out_channels[0], frames, SIDE, SIDE, generator=gen) * 0.1
    audio = torch.randn(batch, frames, AUDIO_TOKENS, CFG.audio_dim, generator=gen)
    masks = [torch.rand(batch, frames, 3, lv.tokens, generator=gen) for lv in audio_mask_levels(CFG, SIDE)]
    return dict(sample=sample, timestep=torch.full((batch,), 500), encoder_hidden_states=context,
                pose_features=pose, audio_tokens=audio, masks=masks)


def make_bank(batch: int = 1, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(entry.shape(batch), generator=gen) for entry in reference_bank_layout(CFG, SIDE))


def test_release_key_layout_matches_checkpoint_json(release_keys):
    expected = release_keys("net_state_dict_keys_shapes.json", "denoising_unet.")
    with torch.device("meta"):
        model = UNet3D(MMGT.unet)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(expected) == 1526
    assert sorted(set(expected) - set(got)) == []  # missing
    assert sorted(set(got) - set(expected)) == []  # unexpected
    assert [k for k in got if got[k] != expected[k]] == []  # shape mismatches
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 1.405) < 0.001  # spec parameter count


@torch.no_grad()
def test_output_shape_and_determinism():
    model = make_unet()
    inputs = make_inputs()
    bank = make_bank()
    out1 = model(**inputs, bank=bank)
    out2 = model(**inputs, bank=bank)
    assert out1.shape == (B, CFG.out_channels, F, SIDE, SIDE)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2)
    again = make_unet()(**inputs, bank=bank)  # same seed, fresh model
    assert torch.equal(out1, again)


@torch.no_grad()
def test_per_frame_path_equals_diffusers_unet2d():
    """With identity motion/audio modules and no bank, the UNet3D is SD1.5 applied to each frame."""
    model = make_unet(randomize=False)  # motion proj_out is zero-init: identity
    for m in model.modules():
        if isinstance(m, MMHAA):
            m.proj_out.weight.zero_()
            m.proj_out.bias.zero_()
    n = len(CFG.block_out_channels)
    unet2d = UNet2DConditionModel(
        in_channels=CFG.in_channels, out_channels=CFG.out_channels, block_out_channels=CFG.block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), layers_per_block=CFG.layers_per_block,
        norm_num_groups=CFG.norm_num_groups, norm_eps=CFG.norm_eps, cross_attention_dim=CFG.cross_attention_dim,
        attention_head_dim=CFG.attention_heads).eval()
    shared = {k: v for k, v in model.state_dict().items() if "motion_modules" not in k and "audio_modules" not in k}
    unet2d.load_state_dict(shared, strict=True)  # the 2D keys are exactly SD1.5's
    inputs = make_inputs()
    out = model(**{**inputs, "pose_features": None})  # (B, 4, F, h, w)
    frames = inputs["sample"].permute(0, 2, 1, 3, 4).reshape(B * F, CFG.in_channels, SIDE, SIDE)
    context = inputs["encoder_hidden_states"].repeat_interleave(F, dim=0)
    expected = unet2d(frames, torch.full((B * F,), 500), encoder_hidden_states=context).sample
    expected = expected.reshape(B, F, CFG.out_channels, SIDE, SIDE).permute(0, 2, 1, 3, 4)
    assert (out - expected).abs().max() < 1e-5


@torch.no_grad()
def test_bank_read_is_attention_over_own_plus_reference_tokens():
    """The read processor equals diffusers attention with keys/values = cat(norm1 tokens, bank repeated)."""
    model = make_unet()
    name = model.bank_names[0]
    attn = model.get_submodule(name).attn1
    tokens = torch.randn(B * F, SIDE * SIDE, CFG.block_out_channels[0])
    bank = make_bank(batch=B)
    out = attn(tokens, reference=ReferenceRead(bank[0], F, uncond_rows=0))
    ref_tokens = bank[0].repeat_interleave(F, dim=0)  # "(b t) l c"
    expected = AttnProcessor2_0()(attn, tokens, encoder_hidden_states=torch.cat([tokens, ref_tokens], dim=1))
    assert (out - expected).abs().max() < 1e-5


@torch.no_grad()
def test_bank_changes_output_and_cfg_uncond_rows_ignore_it():
    model = make_unet()
    inputs = make_inputs()
    bank_a, bank_b = make_bank(seed=5), make_bank(seed=6)
    out_a = model(**inputs, bank=bank_a, uncond_rows=1)
    out_b = model(**inputs, bank=bank_b, uncond_rows=1)
    assert (out_a[0] - out_b[0]).abs().max() < 1e-5  # unconditional sample: plain self-attention
    assert (out_a[1] - out_b[1]).abs().max() > 1e-3  # conditional sample reads the bank
    # Right answers: the uncond row equals a bank-free run, the cond row equals a run of that sample alone.
    single = {k: v for k, v in inputs.items() if k != "masks"}
    first = {k: v[:1] for k, v in single.items()}
    second = {k: v[1:] for k, v in single.items()}
    masks_first = [m[:1] for m in inputs["masks"]]
    masks_second = [m[1:] for m in inputs["masks"]]
    assert (model(**first, masks=masks_first, bank=None) - out_a[:1]).abs().max() < 1e-5
    assert (model(**second, masks=masks_second, bank=bank_a) - out_a[1:]).abs().max() < 1e-5
    # Without CFG both samples read the bank; a 1-row bank broadcasts like the same row repeated.
    shared = model(**inputs, bank=bank_a)
    repeated = model(**inputs, bank=tuple(t.expand(B, -1, -1) for t in bank_a))
    assert (shared - repeated).abs().max() < 1e-5
    assert (shared[0] - out_a[0]).abs().max() > 1e-3


@torch.no_grad()
def test_sdpa_and_export_backends_agree():
    model = make_unet()
    inputs = make_inputs()
    bank = make_bank()
    sdpa = model(**inputs, bank=bank, uncond_rows=1)
    set_attention_backend(model, "export")
    export = model(**inputs, bank=bank, uncond_rows=1)
    assert (sdpa - export).abs().max() < 1e-5
    procs = {type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")}
    assert procs == {"AttnProcessor", "ReferenceReadProcessor"}
    assert all(m.processor.backend == "export" for m in model.modules() if hasattr(m, "processor"))


@torch.no_grad()
def test_masks_one_layout_folded_or_not_and_each_branch_matters():
    model = make_unet()
    inputs = make_inputs()
    base = model(**inputs)
    folded = model(**{**inputs, "masks": [m.reshape(B * F, 3, -1) for m in inputs["masks"]]})
    assert torch.equal(base, folded)
    for branch in range(3):  # every branch of the branch axis reaches the MM-HAA modules
        other = [m.clone() for m in inputs["masks"]]
        for m in other:
            m[:, :, branch] = torch.rand_like(m[:, :, branch])
        assert (model(**{**inputs, "masks": other}) - base).abs().max() > 1e-4


def test_input_errors_are_clear():
    model = make_unet()
    inputs = make_inputs()
    with pytest.raises(ValueError, match="reference bank has"):
        model(**inputs, bank=make_bank()[:-1])
    bad_masks = [inputs["masks"][0][..., :-1], *inputs["masks"][1:]]
    with pytest.raises(ValueError, match="mask of level 0 must be"):
        model(**{**inputs, "masks": bad_masks})
    with pytest.raises(ValueError, match="masks must be 3 tensors, one per MM-HAA level"):
        model(**{**inputs, "masks": inputs["masks"][:2]})
    with pytest.raises(ValueError, match="audio_tokens"):
        model(**{**inputs, "audio_tokens": None})


@torch.no_grad()
def test_timestep_per_frame():
    """A scalar, a (B,) and a constant (B, F) timestep are one computation; a (B, F) one gives each frame its own
    noise level (the rolling schedule): changing one frame's t changes the output."""
    model, inputs, bank = make_unet(), make_inputs(), make_bank()
    per_sample = model(**inputs, bank=bank)
    assert torch.equal(model(**{**inputs, "timestep": 500}, bank=bank), per_sample)
    assert torch.equal(model(**{**inputs, "timestep": torch.full((B, F), 500.0)}, bank=bank), per_sample)
    levels = torch.full((B, F), 500.0)
    levels[:, 1] = 900.0
    assert not torch.allclose(model(**{**inputs, "timestep": levels}, bank=bank), per_sample, atol=1e-4)
    with pytest.raises(ValueError, match=r"timestep must be a scalar, \(B=2,\) or \(B=2, F=3\), got \(2, 4\)"):
        model(**{**inputs, "timestep": torch.zeros(B, F + 1)}, bank=bank)


def test_more_than_32_frames_is_refused():
    with pytest.raises(ValueError, match="at most 32"):
        make_unet(randomize=False)(**make_inputs(batch=1, frames=33))
    module = MotionModule(16, heads=2, max_frames=32, norm_groups=4)
    with pytest.raises(ValueError, match="33 frames.*32 entries"):
        module(torch.randn(33, 16, 2, 2), num_frames=33)


def test_motion_position_table_is_animatediff_sinusoid():
    module = MotionModule(16, heads=2, max_frames=32, norm_groups=4)
    pe = module.temporal_transformer.transformer_blocks[0].attention_blocks[1].pos_encoder.pe
    assert pe.shape == (1, 32, 16)
    pos, i = 7, 3  # channel pair (2i, 2i+1)
    angle = pos / 10000 ** (2 * i / 16)
    assert math.isclose(pe[0, pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
    assert math.isclose(pe[0, pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)
    assert any(k.endswith("attention_blocks.0.pos_encoder.pe") for k in module.state_dict())  # saved buffer


@torch.no_grad()
def test_motion_module_mixes_frames_only_through_time():
    torch.manual_seed(0)
    module = MotionModule(16, heads=2, max_frames=32, norm_groups=4).eval()
    x = torch.randn(2 * 4, 16, 3, 3)  # B=2 samples x F=4 frames, folded
    assert torch.equal(module(x, 4), x)  # zero-init proj_out: identity
    randomize_zero_init(module)
    base = module(x, 4)
    changed = x.clone()
    changed[0] = torch.randn_like(changed[0])  # new content for sample 0, frame 0 (not a shift: GroupNorm)
    out = module(changed, 4)
    assert (out[1:4] - base[1:4]).abs().max() > 1e-4  # other frames of sample 0 see it
    assert (out[4:] - base[4:]).abs().max() < 1e-6  # sample 1 does not
    # Frame order matters through the position table: reversing frames does not just reverse the output.
    rev = torch.cat([x[:4].flip(0), x[4:]])
    assert (module(rev, 4)[:4].flip(0) - base[:4]).abs().max() > 1e-4


@torch.no_grad()
def test_motion_module_equals_animatediffs_rearrange_around_every_attention():
    """One layout change per module gives what AnimateDiff computes with a (b f) <-> (b h w) rearrange around each
    attention block; the reference below writes that out, attention included."""
    torch.manual_seed(0)
    module = MotionModule(16, heads=2, max_frames=32, norm_groups=4).eval()
    randomize_zero_init(module)
    f, b, c, h, w = 5, 2, 16, 3, 4
    x = torch.randn(b * f, c, h, w)
    tt, rows, hw = module.temporal_transformer, b * f, h * w
    y = tt.proj_in(tt.norm(x).permute(0, 2, 3, 1).reshape(rows, hw, c))  # (b f) (h w) c
    blk = tt.transformer_blocks[0]
    for attn, norm in zip(blk.attention_blocks, blk.norms):
        z = norm(y).reshape(b, f, hw, c).transpose(1, 2).reshape(b * hw, f, c) + attn.pos_encoder.pe[:, :f]

        def heads(t):
            return t.reshape(b * hw, f, attn.heads, c // attn.heads).transpose(1, 2)  # (b h w, heads, f, d)

        probs = torch.softmax(heads(attn.to_q(z)) @ heads(attn.to_k(z)).transpose(-1, -2) * attn.scale, dim=-1)
        a = attn.to_out[0]((probs @ heads(attn.to_v(z))).transpose(1, 2).reshape(b * hw, f, c))
        y = a.reshape(b, hw, f, c).transpose(1, 2).reshape(rows, hw, c) + y
    y = blk.ff(blk.ff_norm(y)) + y
    ref = tt.proj_out(y).reshape(rows, h, w, c).permute(0, 3, 1, 2) + x
    torch.testing.assert_close(module(x, f), ref, rtol=1e-5, atol=1e-5)


def test_mask_levels_per_down_block():
    levels = audio_mask_levels(MMGT.unet, MMGT.latent_size)
    assert [(lv.block, lv.level, lv.height, lv.tokens) for lv in levels] == [
        (0, 0, 64, 4096), (1, 1, 32, 1024), (2, 2, 16, 256)]
    assert [lv.height for lv in levels] == list(MMGT.mask_levels[:3])
    layout = reference_bank_layout(MMGT.unet, MMGT.latent_size)
    assert len(layout) == 16 and layout[0].shape() == (1, 4096, 320) and layout[6].shape() == (1, 64, 1280)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # static shapes are intended
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript exporter: opset 17 needs it here
def test_export_traces_the_explicit_math_with_bank_inputs(tmp_path, monkeypatch):
    """Built with the sdpa math, the UNet3D traces to matmul + softmax while torch.onnx.export runs (nothing is
    switched on the module), and every bank tensor and mask level is a named graph input."""
    ort = pytest.importorskip("onnxruntime")
    model = make_unet()
    inputs = make_inputs(frames=2)
    bank = make_bank()
    masks = inputs["masks"]
    names = ["sample", "timestep", "context", "pose", "audio"] + [f"mask_{i}" for i in range(len(masks))] + \
        [f"bank_{i}" for i in range(len(bank))]
    step = DenoiserStep(model, len(masks), uncond_rows=1).eval()
    args = (inputs["sample"], inputs["timestep"].float(), inputs["encoder_hidden_states"], inputs["pose_features"],
            inputs["audio_tokens"], *masks, *bank)
    expected = step(*args)  # eager: the sdpa math

    def no_sdpa(*a, **k):
        raise AssertionError("scaled_dot_product_attention was traced into the export")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    path = tmp_path / "unet3d.onnx"
    torch.onnx.export(step, args, str(path), opset_version=17, dynamo=False, input_names=names, output_names=["out"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names  # every bank tensor is a named graph input
    assert all(m.processor.backend == "sdpa" for m in model.modules() if hasattr(m, "processor"))  # untouched
    (got,) = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
    assert abs(got - expected.numpy()).max() < 1e-4
