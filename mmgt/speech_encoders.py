"""The speech encoders of both MMGT stages: WavLM (Stage I) and wav2vec2 (Stage II), as transformers models.

Owns their config conversion and ``build_*`` / ``load_*`` (incl. unilm's WavLM-Large.pt, renamed with the
``WAVLM_UNILM_TO_HF`` / ``WAVLM_HF_TO_UNILM`` tables), the 25 fps feature paths and their tensor math
(``wavlm_features`` / ``wavlm_hidden``, ``wav2vec2_features`` / ``wav2vec2_hidden``) and the two networks'
contracts (``speech_contracts``: how the pipeline, the backends and ``engine export`` call them by name). SMGA's
audio condition (WavLM features ++ librosa features) is ``mmgt.pipeline.smga_condition``:

Stage I (SMGA) condition, per 25 fps frame (``MMGT_SPEC.md`` section 2):
    WavLM last hidden state (50 fps, linearly resampled to 25 fps)  ++  35 librosa features (sr 12800, hop 512)

Stage II (section 4, Hallo's recipe):
    wav2vec2 CNN features -> interpolated to 25 fps BEFORE the transformer -> all hidden states (T, L, C)

The feature paths keep nothing on the model between calls (no hooks, no buffers): any number of threads may call
them on one shared model. Everything takes 16 kHz float32 mono waveforms (``mmgt.audio_io`` makes them);
transformers and librosa are imported inside the functions that need them.
"""
from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmgt.audio_io import PathLike, Waveform, _as_numpy_wave, _check_frames
from mmgt.config import MMGTConfig, Wav2Vec2Config, WavLMConfig
from mmgt.contract import SAMPLES_PER_FRAME, Contract, Dynamic, Shapes, tensor
from mmgt.seeding import seeded
from mmgt.weights import prefer_twin, safetensors_metadata

if TYPE_CHECKING:  # heavy imports only for type checkers
    from transformers import Wav2Vec2Model, WavLMModel

logger = logging.getLogger(__name__)

WAV2VEC2_NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor zero-mean-unit-variance epsilon
WAVLM_NORM_EPS = 1e-5  # unilm: F.layer_norm(wav, wav.shape) when cfg.normalize (WavLM-Large: True)


# ----------------------------------------------------------------------------------------------------------------
# Waveform -> encoder input, encoder frames -> the 25 fps clock
# ----------------------------------------------------------------------------------------------------------------

def _model_wave(wav: Waveform, model: nn.Module, what: str) -> torch.Tensor:
    """(1, L) float32 tensor on the model's device."""
    device = next(model.parameters()).device
    return torch.from_numpy(_as_numpy_wave(wav, what)).to(device).unsqueeze(0)  # (1, L)


def _pad_to_receptive_field(x: torch.Tensor, config) -> torch.Tensor:
    """Zero-pad a (1, L) waveform so the CNN feature encoder yields at least one frame."""
    field, jump = 1, 1
    for k, s in zip(config.conv_kernel, config.conv_stride):
        field += (k - 1) * jump
        jump *= s
    if x.shape[-1] < field:
        x = F.pad(x, (0, field - x.shape[-1]))  # (1, field)
    return x


def _resample_frames(feats: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(1, N, C) -> (1, n_frames, C): linear interpolation over time with align_corners=True (the reference).

    ``n_frames`` is used as given (no ``int()``): while an export traces the contract, it is the wave's frame axis,
    a dynamic size the graph must keep."""
    out = F.interpolate(feats.transpose(1, 2), size=n_frames, mode="linear", align_corners=True)  # (1, C, T)
    return out.transpose(1, 2)  # (1, T, C)


# ----------------------------------------------------------------------------------------------------------------
# Stage I: WavLM (transformers WavLMModel; the release ships unilm's WavLM-Large.pt)
# ----------------------------------------------------------------------------------------------------------------

# unilm WavLM state-dict names -> transformers WavLMModel names. Regexes are fullmatched; templates are
# str.format'ed with the match groups. Both conv-norm layouts map: layer_norm mode (`.2.1.` in every block,
# WavLM-Large) and default mode (GroupNorm `.2.` in block 0 only).
WAVLM_UNILM_TO_HF: Dict[str, str] = {
    r"mask_emb": "masked_spec_embed",
    r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)": "feature_extractor.conv_layers.{0}.conv.{1}",
    r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)": "feature_extractor.conv_layers.{0}.layer_norm.{1}",
    r"feature_extractor\.conv_layers\.(0)\.2\.(weight|bias)": "feature_extractor.conv_layers.{0}.layer_norm.{1}",
    r"layer_norm\.(weight|bias)": "feature_projection.layer_norm.{0}",
    r"post_extract_proj\.(weight|bias)": "feature_projection.projection.{0}",
    r"encoder\.pos_conv\.0\.bias": "encoder.pos_conv_embed.conv.bias",
    r"encoder\.pos_conv\.0\.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    r"encoder\.pos_conv\.0\.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    r"encoder\.layer_norm\.(weight|bias)": "encoder.layer_norm.{0}",
    r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)": "encoder.layers.{0}.attention.{1}_proj.{2}",
    r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)":
        "encoder.layers.{0}.attention.gru_rel_pos_linear.{1}",
    r"encoder\.layers\.(\d+)\.self_attn\.grep_a": "encoder.layers.{0}.attention.gru_rel_pos_const",
    r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight":
        "encoder.layers.{0}.attention.rel_attn_embed.weight",
    r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)": "encoder.layers.{0}.layer_norm.{1}",
    r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)": "encoder.layers.{0}.feed_forward.intermediate_dense.{1}",
    r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)": "encoder.layers.{0}.feed_forward.output_dense.{1}",
    r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)": "encoder.layers.{0}.final_layer_norm.{1}",
}

# The inverse, for a layer_norm-mode model (WavLM-Large): transformers names -> unilm names.
WAVLM_HF_TO_UNILM: Dict[str, str] = {
    r"masked_spec_embed": "mask_emb",
    r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)": "feature_extractor.conv_layers.{0}.0.{1}",
    r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)": "feature_extractor.conv_layers.{0}.2.1.{1}",
    r"feature_projection\.layer_norm\.(weight|bias)": "layer_norm.{0}",
    r"feature_projection\.projection\.(weight|bias)": "post_extract_proj.{0}",
    r"encoder\.pos_conv_embed\.conv\.bias": "encoder.pos_conv.0.bias",
    r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0": "encoder.pos_conv.0.weight_g",
    r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1": "encoder.pos_conv.0.weight_v",
    r"encoder\.layer_norm\.(weight|bias)": "encoder.layer_norm.{0}",
    r"encoder\.layers\.(\d+)\.attention\.(q|k|v|out)_proj\.(weight|bias)": "encoder.layers.{0}.self_attn.{1}_proj.{2}",
    r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(weight|bias)":
        "encoder.layers.{0}.self_attn.grep_linear.{1}",
    r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const": "encoder.layers.{0}.self_attn.grep_a",
    r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.weight":
        "encoder.layers.{0}.self_attn.relative_attention_bias.weight",
    r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)": "encoder.layers.{0}.self_attn_layer_norm.{1}",
    r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)": "encoder.layers.{0}.fc1.{1}",
    r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)": "encoder.layers.{0}.fc2.{1}",
    r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)": "encoder.layers.{0}.final_layer_norm.{1}",
}


def remap_state_dict(state_dict: Mapping[str, torch.Tensor], table: Mapping[str, str]
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename keys with a regex -> template table. Returns (renamed dict, keys no rule matched)."""
    rules = [(re.compile(pattern), template) for pattern, template in table.items()]
    out: Dict[str, torch.Tensor] = {}
    unmatched: List[str] = []
    for key, value in state_dict.items():
        for pattern, template in rules:
            m = pattern.fullmatch(key)
            if m:
                new_key = template.format(*m.groups())
                if new_key in out:
                    raise ValueError(f"key remap: {key!r} and another key both map to {new_key!r}")
                out[new_key] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def _hf_wavlm_config(cfg: WavLMConfig, **overrides):
    from transformers import WavLMConfig as HFWavLMConfig

    kwargs = dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=tuple(cfg.conv_dim),
        num_buckets=cfg.num_buckets,
        max_bucket_distance=cfg.max_bucket_distance,
        feat_extract_norm=cfg.feat_extract_norm,
        do_stable_layer_norm=cfg.do_stable_layer_norm,
    )
    kwargs.update(overrides)
    n_conv = len(kwargs["conv_dim"])
    if "conv_kernel" not in kwargs and n_conv != 7:
        raise ValueError(f"WavLMConfig.conv_dim has {n_conv} layers; the kernel/stride defaults need 7")
    hf = HFWavLMConfig(**kwargs)
    hf.normalize_input = True  # WavLM-Large: layer-norm the whole waveform first (unilm cfg.normalize)
    return hf




def build_wavlm(cfg: WavLMConfig, seed: Optional[int] = None) -> "WavLMModel":
    """A randomly initialised transformers WavLMModel of ``cfg``'s size, in eval mode (seeded if asked)."""
    from transformers import WavLMModel

    with seeded(seed):
        model = WavLMModel(_hf_wavlm_config(cfg))
    return model.eval()


def _parse_conv_layers(spec: str) -> List[Tuple[int, int, int]]:
    """unilm's conv_feature_layers string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", without eval()."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)}")

    layers = ev(ast.parse(spec, mode="eval"))
    if not isinstance(layers, list) or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(f"not a list of (dim, kernel, stride): {spec!r}")
    return layers


def _wavlm_config_from_unilm(path: Path, ucfg: Mapping, cfg: WavLMConfig):
    """transformers config for a unilm checkpoint, after checking it against ``cfg`` (mismatches named)."""
    try:
        conv = _parse_conv_layers(ucfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"))
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read cfg['conv_feature_layers'] ({exc})") from exc
    mode = ucfg.get("extractor_mode", "default")
    found = {
        "hidden_size": ucfg.get("encoder_embed_dim", 768),
        "num_layers": ucfg.get("encoder_layers", 12),
        "num_heads": ucfg.get("encoder_attention_heads", 12),
        "intermediate_size": ucfg.get("encoder_ffn_embed_dim", 3072),
        "conv_dim": tuple(d for d, _, _ in conv),
        "num_buckets": ucfg.get("num_buckets", 320),
        "max_bucket_distance": ucfg.get("max_distance", 1280),
        "feat_extract_norm": "layer" if mode == "layer_norm" else "group",
        "do_stable_layer_norm": bool(ucfg.get("layer_norm_first", False)),
    }
    expected = {k: getattr(cfg, k) for k in found}
    expected["conv_dim"] = tuple(cfg.conv_dim)
    bad = [f"{k}: checkpoint {found[k]!r} != config {expected[k]!r}" for k in found if found[k] != expected[k]]
    if not ucfg.get("relative_position_embedding", False) or not ucfg.get("gru_rel_pos", False):
        bad.append("relative_position_embedding and gru_rel_pos must both be on (transformers WavLM has both)")
    if ucfg.get("activation_fn", "gelu") != "gelu":
        bad.append(f"activation_fn {ucfg.get('activation_fn')!r} (only gelu is supported)")
    if bad:
        raise ValueError(f"{path}: WavLM checkpoint does not match WavLMConfig: " + "; ".join(bad))
    hf = _hf_wavlm_config(
        cfg,
        conv_kernel=tuple(k for _, k, _ in conv),
        conv_stride=tuple(s for _, _, s in conv),
        conv_bias=bool(ucfg.get("conv_bias", False)),
        num_conv_pos_embeddings=int(ucfg.get("conv_pos", 128)),
        num_conv_pos_embedding_groups=int(ucfg.get("conv_pos_groups", 16)),
    )
    hf.normalize_input = bool(ucfg.get("normalize", False))
    return hf


def _torch_load(path: Path, allow_pickle: bool):
    """torch.load with weights_only=True; a pickle that needs more is refused unless allow_pickle."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError variants here
        if not allow_pickle:
            raise ValueError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({exc}). It pickles objects other than "
                f"tensors and plain containers; if you trust the file, pass allow_pickle=True (runs its pickle code)"
            ) from exc
        logger.warning("%s: loading with weights_only=False (allow_pickle=True)", path)
        return torch.load(str(path), map_location="cpu", weights_only=False)


WAVLM_TWIN_CFG = "unilm_cfg"  # safetensors metadata key of a WavLM-Large twin: the checkpoint's cfg as JSON


def wavlm_unilm_parts(ckpt, path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(state dict, cfg dict) of a unilm checkpoint {'cfg': dict, 'model': state dict}; anything else is an error."""
    if not isinstance(ckpt, Mapping) or "cfg" not in ckpt or "model" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path}: not a unilm WavLM checkpoint (expected keys 'cfg' and 'model', found {keys})")
    ucfg = ckpt["cfg"] if isinstance(ckpt["cfg"], Mapping) else vars(ckpt["cfg"])
    return {k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}, dict(ucfg)


def wavlm_twin_content(ckpt, path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """What the safetensors twin of WavLM-Large.pt holds: its state dict, and its cfg as JSON metadata."""
    tensors, ucfg = wavlm_unilm_parts(ckpt, path)
    try:
        return tensors, {WAVLM_TWIN_CFG: json.dumps(ucfg)}
    except TypeError as e:
        raise ValueError(f"{path}: the checkpoint's cfg is not plain data ({e}); cannot convert it") from e


def read_wavlm_twin(path: PathLike) -> Dict:
    """A WavLM-Large twin read back as the unilm checkpoint dict it was made from."""
    from safetensors.torch import load_file

    meta = safetensors_metadata(path)
    if WAVLM_TWIN_CFG not in meta:
        raise ValueError(f"{path}: no '{WAVLM_TWIN_CFG}' metadata; not a WavLM twin written by `engine weights "
                         "convert`")
    return {"cfg": json.loads(meta[WAVLM_TWIN_CFG]), "model": load_file(str(path))}


def load_wavlm(path_or_dir: PathLike, cfg: WavLMConfig, allow_pickle: bool = False) -> "WavLMModel":
    """WavLM from a transformers directory (config.json + weights, local files only) or unilm's WavLM-Large.pt.

    The unilm checkpoint ({'cfg': dict, 'model': state dict}; or its safetensors twin, preferred when fresh) is
    checked against ``cfg``, renamed with WAVLM_UNILM_TO_HF and loaded strictly: missing or unexpected keys are an
    error naming them. Returns eval mode.
    """
    from transformers import WavLMModel

    path = Path(path_or_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a transformers model directory (no config.json); "
                             f"pass the directory of WavLMModel.save_pretrained or the unilm WavLM-Large.pt file")
        model, info = WavLMModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
        _check_loading_info(path, info)
        _check_hf_sizes(path, model.config, cfg)
        if not hasattr(model.config, "normalize_input"):
            model.config.normalize_input = True
        return model.eval()
    path = prefer_twin(path)  # the safetensors twin of WavLM-Large.pt, when `engine weights convert` made one
    if not path.is_file():
        raise ValueError(f"{path}: no such WavLM checkpoint (file or directory)")

    # 1. the unilm checkpoint: {'cfg': dict, 'model': state dict}
    if path.suffix == ".safetensors":
        ckpt = read_wavlm_twin(path)
    else:
        ckpt = _torch_load(path, allow_pickle)
    tensors, ucfg = wavlm_unilm_parts(ckpt, path)
    hf_cfg = _wavlm_config_from_unilm(path, ucfg, cfg)

    # 2. rename to transformers keys
    state, unmatched = remap_state_dict(tensors, WAVLM_UNILM_TO_HF)
    with seeded(0):  # every value is overwritten below; seeding only keeps the global RNG untouched
        model = WavLMModel(hf_cfg)
    proj = "feature_projection.projection"
    if f"{proj}.weight" not in state and hf_cfg.conv_dim[-1] == hf_cfg.hidden_size:
        # unilm has no post_extract_proj when conv width == hidden width: the identity is the exact equivalent
        state[f"{proj}.weight"] = torch.eye(hf_cfg.hidden_size)
        state[f"{proj}.bias"] = torch.zeros(hf_cfg.hidden_size)

    # 3. strict load, naming every problem
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(unmatched + [k for k in state if k not in expected])
    shapes = [f"{k}: checkpoint {tuple(v.shape)} != model {tuple(expected[k].shape)}"
              for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: WavLM weights do not fit: missing {missing}; unexpected {unexpected}; "
                         f"shape mismatches {shapes}")
    model.load_state_dict(state, strict=True)
    logger.info("loaded unilm WavLM %s (%d tensors)", path, len(state))
    return model.eval()


def _check_loading_info(path: Path, info: Mapping) -> None:
    """Missing or mismatched keys from from_pretrained are an error; unexpected ones are heads we do not use."""
    missing = sorted(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(f"{path}: weights do not fit the model: missing {missing}; mismatched {mismatched}")
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        logger.info("%s: ignoring %d weights of other heads: %s", path, len(unexpected), unexpected[:8])


def _check_hf_sizes(path: Path, hf_cfg, cfg) -> None:
    if cfg is None:
        return
    pairs = {"hidden_size": hf_cfg.hidden_size, "num_layers": hf_cfg.num_hidden_layers,
             "num_heads": hf_cfg.num_attention_heads, "intermediate_size": hf_cfg.intermediate_size,
             "conv_dim": tuple(hf_cfg.conv_dim)}
    bad = [f"{k}: model {v!r} != config {getattr(cfg, k)!r}" for k, v in pairs.items()
           if v != (tuple(getattr(cfg, k)) if k == "conv_dim" else getattr(cfg, k))]
    if bad:
        raise ValueError(f"{path}: model does not match its config: " + "; ".join(bad))


@torch.no_grad()
def wavlm_features(model: "WavLMModel", wav16k: Waveform, n_frames: int,
                   normalize: Optional[bool] = None) -> torch.Tensor:
    """WavLM last hidden state at 25 fps -> (n_frames, hidden) float32 on the model's device.

    As the reference (data/audio_extraction/wavlm_features.py): layer-norm the whole waveform (when the model
    was trained so; ``normalize=None`` reads model.config.normalize_input, True for WavLM-Large), run WavLM
    (50 fps), repeat the last frame once, then linearly resample (align_corners=True) to n_frames. For a 3.2 s
    window this is exactly the reference's ceil((N + 1) / 2) = 80 frames.
    """
    _check_frames(n_frames, "wavlm_features")
    x = _model_wave(wav16k, model, "wavlm_features")  # (1, L)
    if normalize is None:
        normalize = bool(getattr(model.config, "normalize_input", True))
    return wavlm_hidden(model, x, n_frames, normalize)


def wavlm_hidden(model: "WavLMModel", x: torch.Tensor, n_frames: int, normalize: bool) -> torch.Tensor:
    """The tensor math of :func:`wavlm_features` (also what ``engine export`` traces): (1, L) -> (n_frames, H)."""
    if normalize:
        x = F.layer_norm(x, x.shape[-1:], eps=WAVLM_NORM_EPS)  # (1, L)
    x = _pad_to_receptive_field(x, model.config)  # (1, >= 400)
    dtype = next(model.parameters()).dtype
    hidden = model(input_values=x.to(dtype)).last_hidden_state.float()  # (1, N, H) at 50 fps
    hidden = torch.cat([hidden, hidden[:, -1:]], dim=1)  # (1, N + 1, H): the reference's repeated last frame
    return _resample_frames(hidden, n_frames)[0]  # (n_frames, H)


# ----------------------------------------------------------------------------------------------------------------
# Stage II: wav2vec2 hidden states at 25 fps
# ----------------------------------------------------------------------------------------------------------------

def _hf_wav2vec2_config(cfg: Wav2Vec2Config):
    from transformers import Wav2Vec2Config as HFWav2Vec2Config

    if len(cfg.conv_dim) != 7:
        raise ValueError(f"Wav2Vec2Config.conv_dim has {len(cfg.conv_dim)} layers; the kernel/stride defaults need 7")
    hf = HFWav2Vec2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=tuple(cfg.conv_dim),
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        feat_extract_norm="group",  # wav2vec2-base: GroupNorm in the first conv block only
        do_stable_layer_norm=False,  # wav2vec2-base: post-norm transformer
    )
    hf.normalize_input = True  # the base-960h feature extractor has do_normalize=True
    return hf


def build_wav2vec2(cfg: Wav2Vec2Config, seed: Optional[int] = None) -> "Wav2Vec2Model":
    """A randomly initialised transformers Wav2Vec2Model of ``cfg``'s size, in eval mode (seeded if asked)."""
    from transformers import Wav2Vec2Model

    with seeded(seed):
        model = Wav2Vec2Model(_hf_wav2vec2_config(cfg))
    return model.eval()


def load_wav2vec2(model_dir: PathLike, cfg: Optional[Wav2Vec2Config] = None) -> "Wav2Vec2Model":
    """Wav2Vec2Model from a transformers directory (e.g. wav2vec2-base-960h), local files only, eval mode.

    Missing weights are an error (a CTC head in the directory is ignored). If ``cfg`` is given, sizes must match.
    do_normalize of preprocessor_config.json (when present) becomes model.config.normalize_input.
    """
    from transformers import Wav2Vec2Model

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a transformers wav2vec2 directory (no config.json)")
    model, info = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    _check_loading_info(path, info)
    _check_hf_sizes(path, model.config, cfg)
    normalize = True
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        normalize = bool(json.loads(pre.read_text()).get("do_normalize", True))
    model.config.normalize_input = normalize
    return model.eval()


@torch.no_grad()
def wav2vec2_features(model: "Wav2Vec2Model", wav16k: Waveform, n_frames: int,
                      normalize: Optional[bool] = None) -> torch.Tensor:
    """All wav2vec2 hidden states at 25 fps -> (n_frames, num_layers, hidden) float32 on the model's device.

    Hallo's Wav2VecModel recipe: zero-mean-unit-variance input (Wav2Vec2FeatureExtractor, when
    ``normalize``/model.config.normalize_input), CNN features -> linear interpolation (align_corners=True) to
    n_frames BEFORE the transformer -> feature projection -> encoder; the outputs of every layer are stacked
    (hidden_states[1:] of transformers; a pre-norm encoder's last one after its final LayerNorm, see
    ``_encoder_layer_outputs``).
    """
    _check_frames(n_frames, "wav2vec2_features")
    x = _model_wave(wav16k, model, "wav2vec2_features")  # (1, L)
    if normalize is None:
        normalize = bool(getattr(model.config, "normalize_input", True))
    return wav2vec2_hidden(model, x, int(n_frames), normalize)


def wav2vec2_hidden(model: "Wav2Vec2Model", x: torch.Tensor, n_frames: int, normalize: bool) -> torch.Tensor:
    """The tensor math of :func:`wav2vec2_features` (also what ``engine export`` traces): (1, L) -> (n_frames,
    layers, H)."""
    if normalize:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + WAV2VEC2_NORM_EPS)  # (1, L)
    x = _pad_to_receptive_field(x, model.config)
    dtype = next(model.parameters()).dtype

    # 1. CNN features (50 fps) resampled to the 25 fps frame clock
    feats = model.feature_extractor(x.to(dtype))  # (1, C, N)
    feats = _resample_frames(feats.transpose(1, 2), n_frames)  # (1, T, C)

    # 2. projection and transformer, every layer's output kept
    hidden, _ = model.feature_projection(feats)  # (1, T, H)
    outputs = _encoder_layer_outputs(model.encoder, hidden, pre_norm=bool(model.config.do_stable_layer_norm))
    return torch.stack(outputs, dim=2)[0].float()  # (T, L, H)


def _encoder_layer_outputs(encoder: nn.Module, hidden: torch.Tensor, pre_norm: bool) -> List[torch.Tensor]:
    """Every layer's output of a transformers wav2vec2 encoder: [(1, T, H)] * layers.

    Written out rather than collected with forward hooks: a hook lives on the shared model, so concurrent calls
    would collect each other's layers. The steps and their order are Wav2Vec2Encoder's (post-norm: + positional conv,
    LayerNorm, dropout, layers) and Wav2Vec2EncoderStableLayerNorm's (pre-norm: + positional conv, dropout, layers,
    final LayerNorm), with no padding mask (one unpadded waveform; transformers then passes no mask either) and no
    LayerDrop (a training-time regulariser). The pre-norm encoder's last output carries the final LayerNorm, as its
    last_hidden_state and transformers 4.x's hidden_states[-1] do (5.x's hidden_states[-1] is taken before it).
    """
    # 1. positional convolution (and, post-norm, the LayerNorm) before the layers
    hidden = hidden + encoder.pos_conv_embed(hidden)  # (1, T, H)
    if not pre_norm:
        hidden = encoder.layer_norm(hidden)  # (1, T, H)
    hidden = encoder.dropout(hidden)

    # 2. the layers; transformers 4.x layers return a tuple (hidden, attentions), 5.x the tensor
    outputs: List[torch.Tensor] = []
    for layer in encoder.layers:
        out = layer(hidden, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out  # (1, T, H)
        outputs.append(hidden)

    # 3. the pre-norm encoder's final LayerNorm ends its last hidden state
    if pre_norm:
        outputs[-1] = encoder.layer_norm(outputs[-1])  # (1, T, H)
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# Contracts: both encoders take whole frames of 16 kHz audio, (1, F, 640), and return 25 fps features
# ----------------------------------------------------------------------------------------------------------------
class SpeechFeatures(nn.Module):
    """Contract call of a speech encoder: wave (1, F, 640) -> its 25 fps features, by this module's own tensor math
    (``wavlm_hidden``: (F, hidden), the SMGA condition; ``wav2vec2_hidden``: (F, layers, hidden), every layer). The
    frame count is the wave's frame axis, so one graph serves every length in its profile."""

    def __init__(self, encoder: nn.Module, hidden: Callable[..., torch.Tensor]):
        super().__init__()
        self.encoder, self.hidden = encoder, hidden
        self.normalize = bool(getattr(encoder.config, "normalize_input", True))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        n_frames = wave.shape[1]  # a dynamic size while tracing
        return self.hidden(self.encoder, wave.reshape(1, -1), n_frames, self.normalize)


def speech_contracts(cfg: MMGTConfig, shapes: Shapes) -> Tuple[Contract, Contract]:
    """wavlm (a whole SMGA window, W frames) and wav2vec2 (any number of frames up to W: a live window's real audio
    only). Both stay fp32."""
    w = shapes.smga_window
    frames = (Dynamic(0, 1, w, "frames"),)
    wavlm = Contract(
        "wavlm", "WavLM last hidden state at 25 fps (the SMGA condition without the librosa columns)",
        inputs=(tensor("wave", (1, w, SAMPLES_PER_FRAME), dtype="float32"),),
        outputs=(tensor("features", (w, cfg.wavlm.hidden_size), dtype="float32"),),
        module=lambda m: SpeechFeatures(m.wavlm, wavlm_hidden), weights=("wavlm",), config_sections=("wavlm",),
        shape_fields=("smga_window",), allow_fp16=False, version=2)
    wav2vec2 = Contract(
        "wav2vec2", "wav2vec2 hidden states of every layer at 25 fps (input of the audio projection)",
        inputs=(tensor("wave", (1, w, SAMPLES_PER_FRAME), dtype="float32",
                       dynamic=(Dynamic(1, 1, w, "frames"),)),),
        outputs=(tensor("hidden_states", (w, cfg.wav2vec2.num_layers, cfg.wav2vec2.hidden_size), dtype="float32",
                        dynamic=frames),),
        module=lambda m: SpeechFeatures(m.wav2vec2, wav2vec2_hidden), weights=("wav2vec2",),
        config_sections=("wav2vec2",), shape_fields=("smga_window",), allow_fp16=False, version=2)
    return wavlm, wav2vec2


__all__ = [
    "SpeechFeatures", "speech_contracts", "WAVLM_UNILM_TO_HF", "WAVLM_HF_TO_UNILM", "remap_state_dict", "build_wavlm", "load_wavlm", "wavlm_features",
    "wavlm_hidden", "build_wav2vec2", "load_wav2vec2", "wav2vec2_features", "wav2vec2_hidden",
]
