"""MM-HAA audio module: reference math, per-branch mask gating, per-frame audio, zero-init, inner widths."""
import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from mmgt.config import MMGT
from mmgt.mmhaa import MMHAA, AudioTransformerBlock, audio_module_dims

ROWS, SIDE, TOKENS = 4, 4, 5  # B*F folded rows, latent side, audio tokens per frame
CHANNELS, INNER, HEADS, AUDIO_DIM, GROUPS = 32, 16, 2, 24, 8


def randomize_zero_init(module: torch.nn.Module, seed: int = 1) -> None:
    """Give the zero-initialised convs random weights so the audio branches actually contribute."""
    gen = torch.Generator().manual_seed(seed)
    for block in module.modules():
        if isinstance(block, AudioTransformerBlock):
            for conv in (block.zero_conv_full, block.zero_conv_face, block.zero_conv_lip):
                with torch.no_grad():
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
                    conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.3)


def make_module(seed: int = 0, randomize: bool = True, branch_weights=(1.0, 1.0, 2.0)) -> MMHAA:
    torch.manual_seed(seed)
    module = MMHAA(CHANNELS, INNER, HEADS, AUDIO_DIM, GROUPS, branch_weights).eval()
    if randomize:
        randomize_zero_init(module)
    return module


def make_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, CHANNELS, SIDE, SIDE, generator=gen)
    audio = torch.randn(ROWS, TOKENS, AUDIO_DIM, generator=gen)
    masks = [torch.rand(ROWS, SIDE * SIDE, generator=gen) for _ in range(3)]
    return hidden, audio, masks


def stacked(masks):
    """The module's one mask layout: (rows, 3, h*w), the full, face and lip masks on axis 1."""
    return torch.stack(list(masks), dim=1)


def reference_forward(module: MMHAA, hidden, audio, masks, motion_scale):
    """Transcription of the reference Transformer3DModel(use_audio_module) + AudioTemporalBasicTransformerBlock,
    using diffusers' own attention processor and the reference's sqrt(HW) reshape."""
    proc = AttnProcessor2_0()
    rows, _, height, width = hidden.shape
    residual = hidden
    hs = module.proj_in(module.norm(hidden))
    inner = hs.shape[1]
    hs = hs.permute(0, 2, 3, 1).reshape(rows, height * width, inner)
    blk = module.transformer_blocks[0]
    hs = proc(blk.attn1, blk.norm1(hs)) + hs
    normed = blk.norm2(hs)

    def branch(attn, conv, mask):
        out = proc(attn, normed, encoder_hidden_states=audio) * mask[:, :, None]
        bz, sz, c = out.shape
        s = int(sz ** 0.5)
        out = out.reshape(bz, s, s, c).permute(0, 3, 1, 2)
        return conv(out).permute(0, 2, 3, 1).reshape(bz, -1, c)

    full = branch(blk.attn2_0, blk.zero_conv_full, masks[0])
    face = branch(blk.attn2_1, blk.zero_conv_face, masks[1])
    lip = branch(blk.attn2_2, blk.zero_conv_lip, masks[2])
    hs = motion_scale[0] * full + motion_scale[1] * face + motion_scale[2] * lip + hs
    hs = blk.ff(blk.norm3(hs)) + hs
    hs = hs.reshape(rows, height, width, inner).permute(0, 3, 1, 2)
    return module.proj_out(hs) + residual


@torch.no_grad()
def test_matches_reference_math_with_branch_weights():
    module = make_module()
    hidden, audio, masks = make_inputs()
    out = module(hidden, audio, stacked(masks))
    assert out.shape == hidden.shape
    expected = reference_forward(module, hidden, audio, masks, (1.0, 1.0, 2.0))
    assert (out - expected).abs().max() < 1e-5
    # The lip weight 2 matters: weights (1, 1, 1) give a different result.
    assert (out - reference_forward(module, hidden, audio, masks, (1.0, 1.0, 1.0))).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("branch", [0, 1, 2])
def test_each_mask_gates_only_its_branch(branch):
    module = make_module()
    hidden, audio, masks = make_inputs()
    baseline = module(hidden, audio, stacked(masks))
    zeroed = list(masks)
    zeroed[branch] = torch.zeros_like(masks[branch])
    out_mask_zero = module(hidden, audio, stacked(zeroed))
    # A zero mask feeds zeros into that branch's 1x1 conv, leaving only its bias: exactly the same as zeroing
    # the branch conv's weight with the original masks. The other branches are untouched.
    silenced = copy.deepcopy(module)
    block = silenced.transformer_blocks[0]
    conv = (block.zero_conv_full, block.zero_conv_face, block.zero_conv_lip)[branch]
    conv.weight.zero_()
    out_conv_zero = silenced(hidden, audio, stacked(masks))
    assert (out_mask_zero - out_conv_zero).abs().max() < 1e-5
    assert (out_mask_zero - baseline).abs().max() > 1e-3  # the branch did contribute


@torch.no_grad()
def test_each_frame_reads_only_its_own_audio_tokens():
    module = make_module()
    hidden, audio, masks = make_inputs()
    baseline = module(hidden, audio, stacked(masks))
    changed = audio.clone()
    changed[1] = torch.randn_like(changed[1])  # new audio for folded row 1 only
    out = module(hidden, changed, stacked(masks))
    assert (out[0] - baseline[0]).abs().max() < 1e-6
    assert (out[2:] - baseline[2:]).abs().max() < 1e-6
    assert (out[1] - baseline[1]).abs().max() > 1e-3


@torch.no_grad()
def test_fresh_module_ignores_audio_and_masks():
    module = make_module(randomize=False)  # zero convs as initialised
    hidden, audio, masks = make_inputs()
    other_audio = torch.randn_like(audio)
    other_masks = [torch.rand_like(m) for m in masks]
    assert (module(hidden, audio, stacked(masks)) - module(hidden, other_audio, stacked(other_masks))).abs().max() < 1e-6


@torch.no_grad()
def test_non_square_maps_work():
    module = make_module()
    hidden = torch.randn(2, CHANNELS, 2, 6)
    audio = torch.randn(2, TOKENS, AUDIO_DIM)
    masks = [torch.rand(2, 12) for _ in range(3)]
    assert module(hidden, audio, stacked(masks)).shape == (2, CHANNELS, 2, 6)


def test_bad_mask_shape_is_named():
    module = make_module()
    hidden, audio, masks = make_inputs()
    with pytest.raises(ValueError, match=r"mask must be \(B\*F=.*, 3 branches full/face/lip, h\*w="):
        module(hidden, audio, torch.rand(ROWS, 3, SIDE * SIDE + 1))
    with pytest.raises(ValueError, match="3 branches"):
        module(hidden, audio, stacked(masks[:2]))


def test_inner_widths_follow_spec_table():
    cfg = MMGT.unet
    dims = {i: audio_module_dims(cfg.block_out_channels, i, cfg.layers_per_block) for i in cfg.audio_blocks}
    assert dims == {0: ((320, 320), (320, 320)), 1: ((640, 320), (640, 640)), 2: ((1280, 640), (1280, 1280))}
    with torch.device("meta"):
        module = MMHAA(1280, 640, cfg.audio_heads, cfg.audio_dim, cfg.norm_num_groups)
    attn = module.transformer_blocks[0].attn2_0
    assert (attn.heads, attn.to_q.weight.shape[0] // attn.heads) == (8, 80)  # 8 x 80 per the table
    assert tuple(attn.to_k.weight.shape) == (640, 768)
