"""ReferenceNet: release key layout, both presets build, the bank equals diffusers' norm1 outputs in read order."""

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from mmgt.attention import set_attention_backend
from mmgt.config import MMGT, TINY
from mmgt.reference_net import ReferenceNet
from mmgt.unet3d import UNet3D, reference_bank_layout

CFG = TINY.unet
SIDE = 8


def make_net(seed: int = 0) -> ReferenceNet:
    torch.manual_seed(seed)
    return ReferenceNet(CFG).eval()


def make_inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, CFG.in_channels, SIDE, SIDE, generator=gen),
            torch.randn(batch, 1, CFG.cross_attention_dim, generator=gen))


def test_release_key_layout_matches_checkpoint_json(release_keys):
    expected = release_keys("net_state_dict_keys_shapes.json", "reference_unet.")
    with torch.device("meta"):
        net = ReferenceNet(MMGT.unet)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(expected) == 682
    assert sorted(set(expected) - set(got)) == []  # missing
    assert sorted(set(got) - set(expected)) == []  # unexpected
    assert [k for k in got if got[k] != expected[k]] == []  # shape mismatches
    assert abs(sum(p.numel() for p in net.parameters()) / 1e9 - 0.860) < 0.001  # spec parameter count


def test_both_presets_build_with_matching_bank_wiring():
    tiny = make_net()
    with torch.device("meta"):
        release = ReferenceNet(MMGT.unet)
        denoiser = UNet3D(MMGT.unet)
    assert len(release.bank_names) == 16 and len(tiny.bank_names) == 10  # 3x2+1+3x3 and 3x1+1+3x2 blocks
    assert release.bank_names == denoiser.bank_names  # writer and reader agree on the order
    widths = [release.get_submodule(n).norm1.normalized_shape[0] for n in release.bank_names]
    assert widths == [e.channels for e in reference_bank_layout(MMGT.unet, 64)]


@torch.no_grad()
def test_bank_shapes_and_determinism():
    net = make_net()
    latent, context = make_inputs()
    bank = net(latent, context)
    assert [tuple(t.shape) for t in bank] == [e.shape(2) for e in net.bank_layout(SIDE)]
    again = make_net()(latent, context)
    assert all(torch.equal(a, b) for a, b in zip(bank, again))
    assert [k for k, v in vars(net).items() if isinstance(v, (list, tuple, torch.Tensor)) and k != "bank_names"] \
        == []  # nothing of a call is kept on the module


@torch.no_grad()
def test_bank_equals_diffusers_unet2d_norm1_outputs():
    """Right answer from diffusers: run UNet2DConditionModel with the same weights at t = 0 and capture each
    transformer block's norm1 output (what attn1 receives)."""
    net = make_net()
    n = len(CFG.block_out_channels)
    unet = UNet2DConditionModel(
        in_channels=CFG.in_channels, out_channels=CFG.out_channels, block_out_channels=CFG.block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), layers_per_block=CFG.layers_per_block,
        norm_num_groups=CFG.norm_num_groups, norm_eps=CFG.norm_eps, cross_attention_dim=CFG.cross_attention_dim,
        attention_head_dim=CFG.attention_heads).eval()
    missing, unexpected = unet.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["conv_norm_out.bias", "conv_norm_out.weight", "conv_out.bias", "conv_out.weight"]
    assert unexpected == []
    captured = {}
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            module.norm1.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
    latent, context = make_inputs()
    unet(latent, torch.zeros(2), encoder_hidden_states=context)
    bank = net(latent, context)
    assert sorted(captured) == sorted(net.bank_names)
    for name, tensor in zip(net.bank_names, bank):
        assert (tensor - captured[name]).abs().max() < 1e-5, name


@torch.no_grad()
def test_bank_depends_on_context_and_export_backend_agrees():
    net = make_net()
    latent, context = make_inputs()
    bank = net(latent, context)
    zero_ctx = net(latent, torch.zeros_like(context))
    assert torch.equal(bank[0], zero_ctx[0])  # the first block's norm1 comes before any cross-attention
    assert (bank[-1] - zero_ctx[-1]).abs().max() > 1e-4  # later blocks see the CLIP context
    set_attention_backend(net, "export")
    exported = net(latent, context)
    assert max((a - b).abs().max().item() for a, b in zip(bank, exported)) < 1e-5
