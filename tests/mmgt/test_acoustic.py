"""mmgt.acoustic: librosa's 35 features per 25 fps frame and the memo of librosa's constant-Q filter basis."""
import contextlib
import logging
import threading

import numpy as np
import pytest

from mmgt import acoustic as A
from mmgt.audio_io import frames_for_samples

# ---------------------------------------------------------------------------------------------------------------
# librosa features
# ---------------------------------------------------------------------------------------------------------------

def test_librosa_features_shape_one_hots_and_beats_of_a_click_train():
    # 4 s at 16 kHz: a click every 0.5 s (120 bpm) over a quiet 220 Hz tone
    sr, seconds = 16_000, 4.0
    n = int(sr * seconds)
    wav = 0.05 * np.sin(2 * np.pi * 220 * np.arange(n) / sr)
    for k in range(8):
        start = int(k * 0.5 * sr)
        wav[start:start + 80] += np.hanning(80) * 0.9
    n_frames = frames_for_samples(n)  # 100
    feats = A.librosa_features(wav.astype(np.float32), n_frames)
    assert feats.shape == (100, 35) and feats.dtype == np.float32 and np.isfinite(feats).all()
    peaks, beats = feats[:, 33], feats[:, 34]
    assert set(np.unique(peaks)) <= {0.0, 1.0} and set(np.unique(beats)) <= {0.0, 1.0}
    # clicks at frames 12.5 k: every detected onset is within 2 frames of a click, and most clicks are found
    clicks = np.arange(8) * 12.5
    onset_frames = np.flatnonzero(peaks)
    assert len(onset_frames) >= 5
    assert all(np.min(np.abs(clicks - f)) <= 2 for f in onset_frames)
    # beats at 120 bpm: 12.5 frames apart at 25 fps
    beat_frames = np.flatnonzero(beats)
    assert len(beat_frames) >= 4
    assert 11 <= np.median(np.diff(beat_frames)) <= 14
    # the onset envelope peaks on the clicks too
    assert np.argmax(feats[:, 0]) in {int(round(c)) + d for c in clicks for d in (-1, 0, 1, 2)}

    # trimmed / padded to n_frames; padding repeats the last row but never the one-hot events
    short = A.librosa_features(wav[:8000].astype(np.float32), 40)
    assert short.shape == (40, 35)
    assert np.array_equal(short[-1, :33], short[-2, :33]) and not short[13:, 33:].any()



# ---------------------------------------------------------------------------------------------------------------
# memo of librosa's constant-Q filter basis (librosa_features' chroma_cens)
# ---------------------------------------------------------------------------------------------------------------

VQT_BASIS = "__vqt_filter_fft"  # librosa.core.constantq's module global that vqt calls


def speechlike(seconds=3.2, sr=16_000, seed=1):
    """A voiced pitch sweep under a 4 Hz syllable envelope, plus noise."""
    rs = np.random.RandomState(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (env * (0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) + 0.05 * rs.randn(t.size))).astype(np.float32)


def click_train(seconds=3.2, sr=16_000):
    """A click every 0.4 s over a quiet 330 Hz tone."""
    n = int(seconds * sr)
    wav = 0.05 * np.sin(2 * np.pi * 330 * np.arange(n) / sr)
    for start in range(0, n - 80, int(0.4 * sr)):
        wav[start:start + 80] += np.hanning(80) * 0.9
    return wav.astype(np.float32)


@pytest.fixture
def fresh_memo():
    """Each test starts with no memo (the next librosa_features installs an empty one) and leaves none behind."""
    A._set_vqt_basis_memo(True)
    yield
    A._set_vqt_basis_memo(True)


@contextlib.contextmanager
def plain_librosa():
    """librosa's own filter-basis function, no memo in front of it."""
    from librosa.core import constantq

    A._set_vqt_basis_memo(False)
    try:
        assert not isinstance(getattr(constantq, VQT_BASIS), A._FilterBasisMemo)
        yield
    finally:
        A._set_vqt_basis_memo(True)


def installed_memo_counting_librosa_calls():
    """Install the memo and count the calls that reach librosa's function behind it."""
    from librosa.core import constantq

    memo = A._vqt_basis_memo()
    assert memo is not None and getattr(constantq, VQT_BASIS) is memo
    calls = []
    inner = memo.fn

    def counting(*args, **kwargs):
        calls.append(args[0])  # the octave's sample rate
        return inner(*args, **kwargs)

    memo.fn = counting
    return memo, calls


def test_onset_envelope_and_mfcc_are_edges_own_calls():
    """The mel spectrogram is computed once and shared; the values are those of EDGE's two separate calls."""
    import librosa

    wav = (np.random.default_rng(3).standard_normal(80 * 640) * 0.1).astype(np.float32)
    feats = A.librosa_features(wav, 80)
    y = A.resample(wav, 16_000, A.LIBROSA_SAMPLE_RATE)
    envelope = librosa.onset.onset_strength(y=y, sr=A.LIBROSA_SAMPLE_RATE)[:80]
    mfcc = librosa.feature.mfcc(y=y, sr=A.LIBROSA_SAMPLE_RATE, n_mfcc=20).T[:80]
    np.testing.assert_allclose(feats[:, 0], envelope, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(feats[:, 1:21], mfcc, rtol=1e-5, atol=1e-4)
    # the starting tempo of the beat tracker: tempo(y=) at 22.05 kHz, from the same mel spectrogram
    y22 = A.resample(wav, 16_000, A.TEMPO_SAMPLE_RATE)
    env22 = librosa.onset.onset_strength(S=A._mel_db(y22, A.TEMPO_SAMPLE_RATE), sr=A.TEMPO_SAMPLE_RATE)
    assert librosa.feature.tempo(onset_envelope=env22, sr=A.TEMPO_SAMPLE_RATE)[0] == \
        librosa.feature.tempo(y=y22, sr=A.TEMPO_SAMPLE_RATE)[0]


def test_cqt_basis_memo_is_bit_exact_and_skips_librosa_on_a_repeat(fresh_memo):
    waves = {"speech": speechlike(), "clicks": click_train()}
    with plain_librosa():
        plain = {k: A.librosa_features(w, 80) for k, w in waves.items()}
        again = {k: A.librosa_features(w, 80) for k, w in waves.items()}
    assert all(np.array_equal(plain[k], again[k]) for k in waves)  # plain librosa is deterministic

    memo, calls = installed_memo_counting_librosa_calls()
    for name, wav in waves.items():
        n_before = len(calls)
        first = A.librosa_features(wav, 80)
        hits = memo.hits
        second = A.librosa_features(wav, 80)  # all from the memo
        # bit for bit, including the cache hit: vqt scales its lower-octave bases in place, so a memo that
        # handed out its own arrays would change the second call's chroma
        assert first.tobytes() == plain[name].tobytes(), name
        assert second.tobytes() == plain[name].tobytes(), name
        assert first.shape == (80, 35) and np.abs(first[:, 21:33]).sum() > 0  # chroma columns are in there
        # the repeat builds no basis: 7 octaves (12800 Hz down to 200 Hz) answered by the memo
        assert len(calls) == memo.misses and len(calls) - n_before <= 7
        assert memo.hits == hits + 7
    assert calls[:7] == [12800, 6400.0, 3200.0, 1600.0, 800.0, 400.0, 200.0]
    assert memo.bypassed == 0 and len(memo) == memo.misses


def test_cqt_basis_memo_from_four_threads_matches_serial(fresh_memo, in_threads):
    waves = [speechlike(seed=2), click_train(), speechlike(seed=3), click_train(seconds=3.0)]
    with plain_librosa():
        serial = [A.librosa_features(w, 80) for w in waves]
    memo, calls = installed_memo_counting_librosa_calls()
    start = threading.Barrier(4)
    out = [None] * 8

    def work(i):
        start.wait()  # all four start together on an empty memo: racing misses, then hits
        for r in range(2):
            out[2 * i + r] = A.librosa_features(waves[i], 80)

    errors = in_threads(work, 4)
    assert not errors, errors
    for i in range(8):
        assert out[i].tobytes() == serial[i // 2].tobytes(), i
    assert memo.hits + memo.misses == 8 * 7 and memo.hits >= 4 * 7  # every second round is a hit
    assert len(calls) == memo.misses


def test_filter_basis_memo_copies_results_bounds_bytes_and_bypasses_unkeyable_args():
    built = []

    def basis(sr, freqs, window="hann"):
        built.append(sr)
        return np.full((4, 8), float(sr) + freqs.sum(), dtype=np.complex64), 8, freqs * 2.0

    entry = A._MEMO_ENTRY_OVERHEAD + 4 * 8 * 8 + 3 * 8 + 3 * 8  # + basis + lengths + the freqs key, bytes
    memo = A._FilterBasisMemo(basis, max_bytes=2 * entry + 100)
    f = np.array([1.0, 2.0, 3.0])
    b1, n_fft, lengths = memo(100, f)
    b1 *= 0  # the caller scales its copy in place ...
    b2, _, _ = memo(100, f.copy())  # ... equal key, no rebuild, untouched values
    assert built == [100] and memo.hits == 1 and n_fft == 8 and np.array_equal(lengths, 2 * f)
    assert np.all(b2 == 106)
    memo(100.0, f)  # 100.0 and 100 are keyed apart; so are dtypes
    memo(100, f.astype(np.float32))
    assert built == [100, 100.0, 100] and len(memo) == 2  # LRU within the byte bound: the first entry went
    memo(100, f)
    assert built[-1] == 100 and memo.misses == 4
    memo(100, f, window=["hann"])  # lists key by value
    memo(100, f, window={"hann": 1})  # unhashable: straight to the function, not stored
    assert memo.bypassed == 1 and memo.misses == 5


def test_cqt_basis_memo_falls_back_to_plain_librosa_without_the_function(fresh_memo, monkeypatch, caplog):
    from librosa.core import constantq

    original = getattr(constantq, VQT_BASIS)
    monkeypatch.delattr(constantq, VQT_BASIS)
    with caplog.at_level(logging.DEBUG, logger="mmgt.acoustic"):
        assert A._vqt_basis_memo() is None
        assert A._vqt_basis_memo() is None  # decided once: no second look, no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "mmgt.acoustic"]
    assert len(lines) == 1 and VQT_BASIS in lines[0] and "not memoised" in lines[0]
    assert not hasattr(constantq, VQT_BASIS)
    monkeypatch.setattr(constantq, VQT_BASIS, original, raising=False)
    A._set_vqt_basis_memo(True)
    A.librosa_features(click_train(), 80)  # librosa back: installed on the next call
    assert isinstance(getattr(constantq, VQT_BASIS), A._FilterBasisMemo)


def test_silence_and_short_windows_raise_no_warning_per_window():
    """librosa warns about silent input (chroma's tuning estimate finds no pitch) and short windows (its CQT FFT
    exceeds the decimated signal); both are expected, so a live stream must not print one per window."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per location, unless something resets it
        for _ in range(3):
            feats = A.librosa_features(np.zeros(80 * 640, np.float32), 80)  # a silent window
            A.librosa_features(np.zeros(8 * 640, np.float32), 8)  # a short one
    assert np.isfinite(feats).all()
    assert [str(w.message) for w in caught if "librosa" in w.filename] == []
