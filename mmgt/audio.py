"""Audio paths of both MMGT stages: decoding, SMGA's audio condition, and Stage II's audio tokens.

Stage I (SMGA) condition, per 25 fps frame (``MMGT_SPEC.md`` section 2):
    WavLM last hidden state (50 fps, linearly resampled to 25 fps)  ++  35 librosa features (sr 12800, hop 512)

Stage II audio tokens (section 4, Hallo's recipe):
    wav2vec2 CNN features -> interpolated to 25 fps BEFORE the transformer -> all hidden states (T, L, C)
    -> +-2 frame windows (T, 5, L, C) -> AudioProjModel -> 32 tokens of 768 per frame

Everything takes 16 kHz float32 mono waveforms (``load_audio`` / ``resample`` / ``to_mono`` make them).
PyAV, librosa and transformers are imported inside the functions that need them, so importing this module
(for ``AudioProjModel``) stays cheap.
"""
from __future__ import annotations

import ast
import copy
import json
import logging
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmgt.config import AUDIO_SAMPLE_RATE, FPS, LIBROSA_DIM, AudioProjConfig, Wav2Vec2Config, WavLMConfig
from mmgt.seeding import seeded

if TYPE_CHECKING:  # heavy imports only for type checkers
    from transformers import Wav2Vec2Model, WavLMModel

logger = logging.getLogger(__name__)

Waveform = Union[np.ndarray, torch.Tensor]
PathLike = Union[str, Path]

LIBROSA_SAMPLE_RATE = 12_800  # 12800 / 512 = 25 fps exactly
LIBROSA_HOP = 512
TEMPO_SAMPLE_RATE = 22_050  # the reference estimates the starting tempo on librosa.load's default rate
WAV2VEC2_NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor zero-mean-unit-variance epsilon
WAVLM_NORM_EPS = 1e-5  # unilm: F.layer_norm(wav, wav.shape) when cfg.normalize (WavLM-Large: True)


class AudioError(ValueError):
    """An audio input that cannot be used; the message names the file or input and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Decoding and resampling
# ----------------------------------------------------------------------------------------------------------------

def to_mono(x: Waveform, axis: int = 0) -> np.ndarray:
    """Mix a waveform down to float32 mono by averaging channels (as librosa.load does).

    ``x`` is 1-D (already mono) or 2-D with channels on ``axis`` (0: channels-first like PyAV/librosa; use
    ``axis=1`` for sounddevice's (frames, channels)). Integer PCM is scaled to [-1, 1].
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise AudioError(f"to_mono: expected a 1-D or 2-D waveform, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        half = 2.0 ** (np.iinfo(x.dtype).bits - 1)  # 32768 for int16
        # unsigned PCM (uint8) is centred on its midpoint
        offset = 0.0 if np.issubdtype(x.dtype, np.signedinteger) else half
        x = (x.astype(np.float64) - offset) / half
    if x.ndim == 2:
        x = x.mean(axis=axis)
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(wav: Waveform, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample an in-memory waveform (last axis is time) with soxr (librosa's default, as the reference).

    Output length is ceil(n * dst_rate / src_rate). Used for live chunks; files go through ``load_audio``.
    """
    import librosa

    if src_rate <= 0 or dst_rate <= 0:
        raise AudioError(f"resample: sample rates must be positive, got {src_rate} -> {dst_rate}")
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if src_rate == dst_rate:
        return wav.copy()
    if wav.shape[-1] == 0:
        return np.zeros(wav.shape[:-1] + (0,), dtype=np.float32)
    return librosa.resample(wav, orig_sr=src_rate, target_sr=dst_rate, res_type="soxr_hq").astype(np.float32)


def load_audio(path: PathLike, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any file PyAV reads -> float32 mono in [-1, 1] at ``sample_rate``.

    Works for wav, mp3, flac, m4a, the audio of an mp4, ... at any rate and channel count: PyAV's resampler
    changes the rate (keeping the channels), then channels are averaged (librosa.load's mixdown).
    Raises AudioError for a missing file, an unreadable file, no audio stream, or 0 samples.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise AudioError(f"{path}: not a readable audio/video file ({exc})") from exc

    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioError(f"{path}: no audio stream (streams found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        # planar float keeps every channel apart, so the mixdown below is a plain mean
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate)
        chunks: List[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # (C, n)
            for out in resampler.resample(None):  # flush the resampler's delay line
                chunks.append(out.to_ndarray())
        except av.FFmpegError as exc:
            raise AudioError(f"{path}: decoding the audio stream failed ({exc})") from exc

    chunks = [c for c in chunks if c.shape[-1] > 0]
    if not chunks:
        raise AudioError(f"{path}: the audio stream has no samples (0-length audio)")
    wav = to_mono(np.concatenate(chunks, axis=1), axis=0)  # (n,)
    # lossy decoders (aac, mp3) overshoot full scale slightly
    np.clip(wav, -1.0, 1.0, out=wav)
    logger.debug("loaded %s: %d samples at %d Hz", path, wav.shape[0], sample_rate)
    return wav


def _as_numpy_wave(wav: Waveform, what: str) -> np.ndarray:
    """1-D finite float32 numpy waveform, or an AudioError naming ``what``."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().float().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise AudioError(f"{what}: expected a 1-D mono waveform, got shape {wav.shape} (use to_mono)")
    if wav.shape[0] == 0:
        raise AudioError(f"{what}: empty waveform")
    if not np.isfinite(wav).all():
        raise AudioError(f"{what}: waveform contains NaN or Inf")
    return wav


def _check_frames(n_frames: int, what: str) -> None:
    if int(n_frames) != n_frames or n_frames < 1:
        raise AudioError(f"{what}: n_frames must be a positive integer, got {n_frames!r}")


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
    """(1, N, C) -> (1, n_frames, C): linear interpolation over time with align_corners=True (the reference)."""
    out = F.interpolate(feats.transpose(1, 2), size=int(n_frames), mode="linear", align_corners=True)  # (1, C, T)
    return out.transpose(1, 2)  # (1, T, C)


# ----------------------------------------------------------------------------------------------------------------
# Stage I: in-process memo of librosa's constant-Q filter basis
# ----------------------------------------------------------------------------------------------------------------
# chroma_cens -> chroma_cqt -> cqt -> vqt rebuilds its filter basis (librosa.core.constantq.__vqt_filter_fft) once
# per octave (7) on every call: over half of librosa_features' time. The basis depends on the settings and on the
# tuning that chroma_cqt estimates from each window, which librosa quantises to 0.01 bins (101 values), so the
# whole set this module can ask for is 7 * 101 small bases (~7 KB each with its key, ~5 MB in all). vqt looks the
# function up as a module global at call time, so replacing that global puts the memo in front of every caller.

_VQT_BASIS_FN = "__vqt_filter_fft"  # librosa 0.10 / 0.11: returns (csr fft_basis, n_fft, lengths)
_VQT_MEMO_MAX_BYTES = 16 * 2**20  # holds all 707 of our bases (~5 MB) with room for other cqt users
_MEMO_ENTRY_OVERHEAD = 256  # bytes counted per entry on top of its buffers (objects, dict slot)


class _Unkeyable(TypeError):
    """An argument the memo cannot key exactly (unhashable, object array): that call goes straight to librosa."""


def _memo_key(value):
    """Exact, hashable key: arrays by dtype + shape + bytes, containers recursively, the rest by (type, value)."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _Unkeyable("object array")
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_memo_key(v) for v in value))
    try:
        hash(value)
    except TypeError as e:
        raise _Unkeyable(str(e)) from None
    return (type(value), value)  # the type keeps 12800 and 12800.0 apart


def _memo_nbytes(value) -> int:
    """Buffer bytes of a key or a result: arrays, sparse-matrix arrays, bytes, through containers; 0 for scalars."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(_memo_nbytes(v) for v in value)
    parts = [getattr(value, name, None) for name in ("data", "indices", "indptr")]  # scipy.sparse csr/csc
    if all(isinstance(p, np.ndarray) for p in parts):
        return sum(p.nbytes for p in parts)
    return 0


def _memo_copy(value):
    """A private copy of a cached result: vqt scales the basis in place (``fft_basis[:] *= ...``)."""
    import scipy.sparse

    if isinstance(value, tuple):
        return tuple(_memo_copy(v) for v in value)
    if isinstance(value, np.ndarray) or scipy.sparse.issparse(value):
        return value.copy()  # ndarray / sparse .copy() duplicate the buffers, values bit for bit
    if isinstance(value, (int, float, complex, str, bytes, type(None), np.generic)):
        return value  # immutable
    return copy.deepcopy(value)


class _FilterBasisMemo:
    """Thread-safe LRU memo, bounded in bytes, in front of librosa's filter-basis function.

    Every call returns a fresh copy of the cached result, so callers may mutate it. On a miss the basis is built
    outside the lock (two threads missing the same key both build it, with equal values; no one waits on another).
    ``hits`` / ``misses`` count memo answers and calls into librosa (``bypassed``: arguments that cannot be keyed).
    """

    _mmgt_vqt_memo = True  # marks an installed memo, also one made by an earlier copy of this module (reload)

    def __init__(self, fn, max_bytes: int = _VQT_MEMO_MAX_BYTES):
        self.fn = fn
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.bypassed = 0
        self._entries: "OrderedDict[tuple, Tuple[object, int]]" = OrderedDict()  # key -> (result, nbytes)
        self._nbytes = 0
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        try:
            key = _memo_key((args, tuple(sorted(kwargs.items()))))
        except _Unkeyable:
            with self._lock:
                self.bypassed += 1
            return self.fn(*args, **kwargs)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if entry is not None:
            return _memo_copy(entry[0])

        result = self.fn(*args, **kwargs)
        size = _MEMO_ENTRY_OVERHEAD + _memo_nbytes(key) + _memo_nbytes(result)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes:
                old = self._entries.pop(key, None)
                self._nbytes += size - (old[1] if old is not None else 0)
                self._entries[key] = (result, size)
                while self._nbytes > self.max_bytes:  # drop least recently used
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self._nbytes -= dropped
        return _memo_copy(result)

    def __len__(self) -> int:
        return len(self._entries)


_VQT_MEMO: Optional[_FilterBasisMemo] = None
_VQT_MEMO_STATE = "unset"  # "unset" -> "installed" | "unavailable"; "disabled" while a test turns it off
_VQT_MEMO_LOCK = threading.Lock()


def _vqt_basis_memo() -> Optional[_FilterBasisMemo]:
    """Install the memo in librosa once (idempotent; librosa must be importable) and return it, or None.

    Called by librosa_features, never at import of this module. A librosa without the function gets one debug
    line and plain librosa.
    """
    global _VQT_MEMO, _VQT_MEMO_STATE
    if _VQT_MEMO_STATE != "unset":  # fast path, no lock
        return _VQT_MEMO
    with _VQT_MEMO_LOCK:
        if _VQT_MEMO_STATE != "unset":
            return _VQT_MEMO
        from librosa.core import constantq

        fn = getattr(constantq, _VQT_BASIS_FN, None)
        if getattr(fn, "_mmgt_vqt_memo", False):  # already in place: never wrap a memo in a memo
            _VQT_MEMO, _VQT_MEMO_STATE = fn, "installed"
        elif callable(fn):
            _VQT_MEMO = _FilterBasisMemo(fn)
            setattr(constantq, _VQT_BASIS_FN, _VQT_MEMO)
            _VQT_MEMO_STATE = "installed"
        else:
            import librosa

            logger.debug("librosa %s has no librosa.core.constantq.%s: CQT filter bases are not memoised",
                         getattr(librosa, "__version__", "?"), _VQT_BASIS_FN)
            _VQT_MEMO_STATE = "unavailable"
        return _VQT_MEMO


def _set_vqt_basis_memo(enabled: bool) -> None:
    """Tests only: False puts librosa's own function back and keeps the memo out; True lets the next
    librosa_features call install a fresh, empty memo."""
    global _VQT_MEMO, _VQT_MEMO_STATE
    with _VQT_MEMO_LOCK:
        if _VQT_MEMO is not None:
            from librosa.core import constantq

            if getattr(constantq, _VQT_BASIS_FN, None) is _VQT_MEMO:
                setattr(constantq, _VQT_BASIS_FN, _VQT_MEMO.fn)
        _VQT_MEMO = None
        _VQT_MEMO_STATE = "unset" if enabled else "disabled"


# ----------------------------------------------------------------------------------------------------------------
# Stage I: librosa features (EDGE's extract_baseline_features at 25 fps)
# ----------------------------------------------------------------------------------------------------------------

def librosa_features(wav16k: Waveform, n_frames: int, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """35 hand-made features per 25 fps frame -> (n_frames, 35) float32.

    Columns: onset envelope (0), MFCC 1-20 (1-20), chroma_cens (21-32), onset-peak one-hot (33), beat one-hot (34).
    EDGE's recipe at sr 12800 / hop 512; the starting tempo of the beat tracker is estimated on 22.05 kHz audio
    as the reference does (``lr.beat.tempo(y=lr.load(f)[0])``). Trimmed to n_frames; a short clip is padded by
    repeating the last frame, with the one-hot columns padded by zeros.
    """
    import librosa

    _vqt_basis_memo()  # chroma_cens' CQT filter bases are built once per process, not per call
    wav = _as_numpy_wave(wav16k, "librosa_features")
    _check_frames(n_frames, "librosa_features")
    y = resample(wav, sample_rate, LIBROSA_SAMPLE_RATE)  # (n * 0.8,) at 16 kHz in
    sr, hop = LIBROSA_SAMPLE_RATE, LIBROSA_HOP

    # 1. continuous features, EDGE's calls with librosa defaults (n_fft 2048, hop 512)
    envelope = librosa.onset.onset_strength(y=y, sr=sr)  # (N,)
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20).T  # (N, 20)
    with warnings.catch_warnings():
        # chroma_cens' CQT works on octave-decimated copies; on short windows librosa warns that its
        # FFT exceeds them, which is expected and harmless here
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large")
        chroma = librosa.feature.chroma_cens(y=y, sr=sr, hop_length=hop, n_chroma=12).T  # (N, 12)

    # 2. onset peaks as a one-hot column
    peak_idxs = librosa.onset.onset_detect(onset_envelope=envelope.flatten(), sr=sr, hop_length=hop)
    peak_onehot = np.zeros_like(envelope, dtype=np.float32)
    peak_onehot[peak_idxs] = 1.0  # (N,)

    # 3. beats as a one-hot column; the tracker starts from a tempo estimated on 22.05 kHz audio
    y22 = resample(wav, sample_rate, TEMPO_SAMPLE_RATE)
    start_bpm = float(np.atleast_1d(librosa.feature.tempo(y=y22, sr=TEMPO_SAMPLE_RATE))[0])
    _, beat_idxs = librosa.beat.beat_track(onset_envelope=envelope, sr=sr, hop_length=hop,
                                           start_bpm=start_bpm, tightness=100)
    beat_onehot = np.zeros_like(envelope, dtype=np.float32)
    beat_onehot[np.asarray(beat_idxs, dtype=np.int64)] = 1.0  # (N,)

    feats = np.concatenate([envelope[:, None], mfcc, chroma, peak_onehot[:, None], beat_onehot[:, None]],
                           axis=-1).astype(np.float32)  # (N, 35)
    assert feats.shape[1] == LIBROSA_DIM

    # 4. exactly n_frames rows (center=True framing gives 1 + len // 512, usually one more than needed)
    if feats.shape[0] >= n_frames:
        return np.ascontiguousarray(feats[:n_frames])
    pad = np.repeat(feats[-1:], n_frames - feats.shape[0], axis=0)  # (n_frames - N, 35)
    pad[:, 33:] = 0.0  # a repeated onset/beat would invent events
    return np.concatenate([feats, pad], axis=0)


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


def load_wavlm(path_or_dir: PathLike, cfg: WavLMConfig, allow_pickle: bool = False) -> "WavLMModel":
    """WavLM from a transformers directory (config.json + weights, local files only) or unilm's WavLM-Large.pt.

    The unilm checkpoint ({'cfg': dict, 'model': state dict}) is checked against ``cfg``, renamed with
    WAVLM_UNILM_TO_HF and loaded strictly: missing or unexpected keys are an error naming them. Returns eval mode.
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
    if not path.is_file():
        raise ValueError(f"{path}: no such WavLM checkpoint (file or directory)")

    # 1. the unilm checkpoint: {'cfg': dict, 'model': state dict}
    ckpt = _torch_load(path, allow_pickle)
    if not isinstance(ckpt, Mapping) or "cfg" not in ckpt or "model" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path}: not a unilm WavLM checkpoint (expected keys 'cfg' and 'model', found {keys})")
    ucfg = ckpt["cfg"] if isinstance(ckpt["cfg"], Mapping) else vars(ckpt["cfg"])
    hf_cfg = _wavlm_config_from_unilm(path, ucfg, cfg)

    # 2. rename to transformers keys
    state, unmatched = remap_state_dict(ckpt["model"], WAVLM_UNILM_TO_HF)
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


def smga_condition(wavlm_model: "WavLMModel", wav16k: Waveform, n_frames: int) -> torch.Tensor:
    """SMGA's audio condition: cat(WavLM features, librosa features) -> (n_frames, hidden + 35) float32."""
    wav = _as_numpy_wave(wav16k, "smga_condition")
    wavlm = wavlm_features(wavlm_model, wav, n_frames)  # (T, H)
    extra = torch.from_numpy(librosa_features(wav, n_frames)).to(wavlm.device)  # (T, 35)
    return torch.cat([wavlm, extra], dim=1)  # (T, H + 35)


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
    (hidden_states[1:] of transformers).
    """
    _check_frames(n_frames, "wav2vec2_features")
    x = _model_wave(wav16k, model, "wav2vec2_features")  # (1, L)
    if normalize is None:
        normalize = bool(getattr(model.config, "normalize_input", True))
    return wav2vec2_hidden(model, x, n_frames, normalize)


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

    # 2. projection and transformer; forward hooks collect every layer's output (version-proof, no output flags)
    hidden, _ = model.feature_projection(feats)  # (1, T, H)
    outputs: List[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.encoder.layers]
    try:
        last = model.encoder(hidden).last_hidden_state  # (1, T, H)
    finally:
        for h in hooks:
            h.remove()
    if len(outputs) != len(model.encoder.layers):
        raise RuntimeError(f"wav2vec2_features: captured {len(outputs)} layer outputs, "
                           f"expected {len(model.encoder.layers)}")
    # a pre-norm encoder's last hidden state carries the final LayerNorm (transformers' hidden_states[-1] too)
    outputs[-1] = last
    return torch.stack(outputs, dim=2)[0].float()  # (T, L, H)


def audio_windows(feats: Union[torch.Tensor, np.ndarray], radius: int = 2) -> Union[torch.Tensor, np.ndarray]:
    """(T, ...) -> (T, 2 * radius + 1, ...): frame t gets frames t-radius .. t+radius, clamped at the edges."""
    if feats.shape[0] < 1:
        raise AudioError("audio_windows: no frames")
    n = feats.shape[0]
    idx = np.clip(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], 0, n - 1)  # (T, 2r+1)
    if isinstance(feats, torch.Tensor):
        return feats[torch.from_numpy(idx).to(feats.device)]  # (T, 2r+1, ...)
    return np.asarray(feats)[idx]


# ----------------------------------------------------------------------------------------------------------------
# Stage II: audio projection (release keys audioproj.proj1/proj2/proj3/norm)
# ----------------------------------------------------------------------------------------------------------------

class AudioProjModel(nn.Module):
    """Windowed wav2vec2 states -> ``context_tokens`` tokens per frame (Hallo's AudioProjModel).

    (B, F, seq_len, blocks, channels) -> flatten -> proj1 -> ReLU -> proj2 -> ReLU -> proj3
    -> (B, F, context_tokens, output_dim) -> LayerNorm.
    """

    def __init__(self, cfg: AudioProjConfig):
        super().__init__()
        self.cfg = cfg
        self.input_dim = cfg.seq_len * cfg.blocks * cfg.channels  # 5 * 12 * 768 = 46080 at release size
        self.proj1 = nn.Linear(self.input_dim, cfg.intermediate_dim)
        self.proj2 = nn.Linear(cfg.intermediate_dim, cfg.intermediate_dim)
        self.proj3 = nn.Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim)
        self.norm = nn.LayerNorm(cfg.output_dim)

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        expected = (cfg.seq_len, cfg.blocks, cfg.channels)
        if audio_embeds.dim() != 5 or tuple(audio_embeds.shape[2:]) != expected:
            raise ValueError(f"AudioProjModel: expected (B, F, {', '.join(map(str, expected))}), "
                             f"got {tuple(audio_embeds.shape)}")
        b, f = audio_embeds.shape[:2]
        x = audio_embeds.reshape(b * f, self.input_dim)  # (B*F, W*L*C)
        x = torch.relu(self.proj1(x))  # (B*F, I)
        x = torch.relu(self.proj2(x))  # (B*F, I)
        tokens = self.proj3(x).reshape(b * f, cfg.context_tokens, cfg.output_dim)  # (B*F, K, D)
        tokens = self.norm(tokens)  # (B*F, K, D)
        return tokens.reshape(b, f, cfg.context_tokens, cfg.output_dim)  # (B, F, K, D)


def frames_for_samples(n_samples: int, sample_rate: int = AUDIO_SAMPLE_RATE, fps: int = FPS) -> int:
    """Video frames covered by ``n_samples`` of audio: ceil(n / sr * fps), the reference's seq_len."""
    return -(-int(n_samples) * fps // sample_rate)  # integer ceil: no float rounding at exact multiples


__all__ = [
    "AudioError", "load_audio", "resample", "to_mono", "librosa_features", "WAVLM_UNILM_TO_HF",
    "WAVLM_HF_TO_UNILM", "remap_state_dict", "build_wavlm", "load_wavlm", "wavlm_features", "smga_condition",
    "build_wav2vec2", "load_wav2vec2", "wav2vec2_features", "audio_windows", "AudioProjModel",
    "frames_for_samples", "LIBROSA_SAMPLE_RATE", "LIBROSA_HOP",
]
