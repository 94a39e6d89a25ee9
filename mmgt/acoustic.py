"""Stage I's hand-made acoustic features: librosa's 35 per 25 fps frame (EDGE's extract_baseline_features).

Owns ``librosa_features`` (onset envelope, MFCC, chroma_cens, onset peaks, beats at sr 12800 / hop 512), its
rates (``LIBROSA_SAMPLE_RATE``, ``LIBROSA_HOP``, ``TEMPO_SAMPLE_RATE``) and the in-process memo of librosa's
constant-Q filter basis that keeps chroma_cens from rebuilding it on every call. SMGA's audio condition
(WavLM ++ these) is ``mmgt.pipeline.smga_condition``. librosa is imported inside the functions that need it.
"""
from __future__ import annotations

import copy
import functools
import logging
import threading
import warnings
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np

from mmgt.audio_io import Waveform, _as_numpy_wave, _check_frames, resample
from mmgt.config import AUDIO_SAMPLE_RATE, LIBROSA_DIM

logger = logging.getLogger(__name__)

LIBROSA_SAMPLE_RATE = 12_800  # 12800 / 512 = 25 fps exactly
LIBROSA_HOP = 512
TEMPO_SAMPLE_RATE = 22_050  # the reference estimates the starting tempo on librosa.load's default rate


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
# librosa's warnings about inputs it handles as intended
# ----------------------------------------------------------------------------------------------------------------
# chroma_cens' CQT works on octave-decimated copies, and on a window that short librosa warns its FFT exceeds them;
# on silence (a live stream between sentences, padding) chroma's tuning estimate sees no pitched frequency, warns and
# uses 0. Both are expected for every such window (a live stream would print one per window), so they are ignored by
# a filter installed once (catch_warnings around each call would reset Python's once-per-location memory of every
# other warning in the process, and is not thread-safe).
EXPECTED_LIBROSA_WARNINGS = (r"n_fft=\d+ is too large", r"Trying to estimate tuning from empty frequency set")


def _ignore_expected_warnings() -> None:
    """Install the ignore filters of EXPECTED_LIBROSA_WARNINGS where missing (a test's catch_warnings may have
    dropped them); installing only what is missing leaves the filter list, and every warning registry, alone."""
    present = {f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None}
    for pattern in EXPECTED_LIBROSA_WARNINGS:
        if pattern not in present:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


# ----------------------------------------------------------------------------------------------------------------
# Stage I: librosa features (EDGE's extract_baseline_features at 25 fps)
# ----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int) -> np.ndarray:
    """librosa's mel filter bank with its defaults (128 mels, Slaney), built once per rate (read-only: shared)."""
    import librosa

    basis = librosa.filters.mel(sr=sr, n_fft=n_fft)  # (128, 1 + n_fft // 2)
    basis.setflags(write=False)
    return basis


def _mel_db(y: np.ndarray, sr: int, n_fft: int = 2048, hop: int = LIBROSA_HOP) -> np.ndarray:
    """``power_to_db(librosa.feature.melspectrogram(y=y, sr=sr))`` with its defaults, the filter bank built once:
    the same values (the power spectrogram and the product are librosa's own), without rebuilding the bank."""
    import librosa

    power = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop)) ** 2  # (1 + n_fft // 2, N)
    return librosa.power_to_db(_mel_basis(sr, n_fft) @ power)  # (128, N)


def librosa_features(wav16k: Waveform, n_frames: int, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """35 hand-made features per 25 fps frame -> (n_frames, 35) float32.

    Columns: onset envelope (0), MFCC 1-20 (1-20), chroma_cens (21-32), onset-peak one-hot (33), beat one-hot (34).
    EDGE's recipe at sr 12800 / hop 512; the starting tempo of the beat tracker is estimated on 22.05 kHz audio
    as the reference does (``lr.beat.tempo(y=lr.load(f)[0])``). Trimmed to n_frames; a short clip is padded by
    repeating the last frame, with the one-hot columns padded by zeros.
    """
    import librosa

    _vqt_basis_memo()  # chroma_cens' CQT filter bases are built once per process, not per call
    _ignore_expected_warnings()  # silence and short windows: librosa's warnings about them are not news
    wav = _as_numpy_wave(wav16k, "librosa_features")
    _check_frames(n_frames, "librosa_features")
    y = resample(wav, sample_rate, LIBROSA_SAMPLE_RATE)  # (n * 0.8,) at 16 kHz in
    sr, hop = LIBROSA_SAMPLE_RATE, LIBROSA_HOP

    # 1. continuous features, EDGE's calls with librosa defaults (n_fft 2048, hop 512). onset_strength(y) and mfcc(y)
    # each compute power_to_db(melspectrogram(y)) with the same defaults: computed once here, the values are identical
    mel_db = _mel_db(y, sr)  # (128, N)
    envelope = librosa.onset.onset_strength(S=mel_db, sr=sr)  # (N,)
    mfcc = librosa.feature.mfcc(S=mel_db, sr=sr, n_mfcc=20).T  # (N, 20)
    chroma = librosa.feature.chroma_cens(y=y, sr=sr, hop_length=hop, n_chroma=12).T  # (N, 12)

    # 2. onset peaks as a one-hot column
    peak_idxs = librosa.onset.onset_detect(onset_envelope=envelope.flatten(), sr=sr, hop_length=hop)
    peak_onehot = np.zeros_like(envelope, dtype=np.float32)
    peak_onehot[peak_idxs] = 1.0  # (N,)

    # 3. beats as a one-hot column; the tracker starts from a tempo estimated on 22.05 kHz audio
    y22 = resample(wav, sample_rate, TEMPO_SAMPLE_RATE)
    envelope22 = librosa.onset.onset_strength(S=_mel_db(y22, TEMPO_SAMPLE_RATE), sr=TEMPO_SAMPLE_RATE)  # = tempo(y=)'s
    start_bpm = float(np.atleast_1d(librosa.feature.tempo(onset_envelope=envelope22, sr=TEMPO_SAMPLE_RATE))[0])
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



__all__ = ["librosa_features", "LIBROSA_SAMPLE_RATE", "LIBROSA_HOP", "TEMPO_SAMPLE_RATE"]
