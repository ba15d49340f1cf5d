"""engine.audio: in-process decoding of WAV/MP3/FLAC/OGG, ffmpeg for the rest, clear errors."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from math import gcd
from pathlib import Path

import numpy as np
import pytest

from engine import audio
from engine.audio import (
    AudioError,
    AudioTooLong,
    audio_duration_s,
    decode_audio,
    find_ffmpeg,
    sniff_format,
)
from tests.conftest import require_tool
from tests.wav_files import float_wav, int_wav

FREQ = 440.0
AMP = 0.5


def _sine(rate: int, seconds: float, freq: float = FREQ) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return AMP * np.sin(2 * np.pi * freq * t)


def _assert_sine(y: np.ndarray, seconds: float, tol: float) -> None:
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 16_000 * seconds) <= 2
    ref = _sine(16_000, len(y) / 16_000)
    middle = slice(400, len(y) - 400)  # skip the resampling filter's edges
    assert np.max(np.abs(y[middle] - ref[middle])) < tol


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_int_wav_any_depth_and_rate(width: int, rate: int) -> None:
    y = decode_audio(int_wav(_sine(rate, 0.5), rate, width), filename="a.wav")
    _assert_sine(y, 0.5, tol=0.02 if width == 1 else 2e-3)


@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_float32_wav(rate: int) -> None:
    _assert_sine(decode_audio(float_wav(_sine(rate, 0.5), rate)), 0.5, tol=2e-3)


def test_stereo_is_mixed_down() -> None:
    rate = 44_100
    left = _sine(rate, 0.5)
    frames = np.stack([left, np.zeros_like(left)], axis=1)
    raw = np.round(frames * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(raw)
    y = decode_audio(buf.getvalue())
    ref = _sine(16_000, len(y) / 16_000) / 2
    assert np.max(np.abs(y[400:-400] - ref[400:-400])) < 2e-3


def test_stereo_identical_channels() -> None:
    _assert_sine(decode_audio(int_wav(_sine(48_000, 0.5), 48_000, 2, channels=2)), 0.5, 2e-3)


def test_format_is_sniffed_not_taken_from_filename() -> None:
    wav = int_wav(_sine(16_000, 0.25), 16_000, 2)
    assert sniff_format(wav) == "wav"
    _assert_sine(decode_audio(wav, filename="voice.mp3"), 0.25, 2e-3)


def test_duration() -> None:
    assert audio_duration_s(np.zeros(24_000, np.float32)) == pytest.approx(1.5)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One 44.1 kHz stereo sine encoded to every container ffmpeg can write here."""
    ffmpeg = require_tool("ffmpeg")
    root = tmp_path_factory.mktemp("enc")
    src = root / "src.wav"
    src.write_bytes(int_wav(_sine(44_100, 1.0), 44_100, 2, channels=2))
    codecs = {
        "mp3": ["-c:a", "libmp3lame"],
        "flac": ["-c:a", "flac"],
        "ogg": ["-c:a", "libvorbis"],
        "opus": ["-c:a", "libopus"],
        "m4a": ["-c:a", "aac"],
        "webm": ["-c:a", "libopus"],
    }
    out: dict[str, bytes] = {}
    for ext, args in codecs.items():
        dst = root / f"tone.{ext}"
        cmd = [ffmpeg, "-nostdin", "-loglevel", "error", "-i", str(src), *args, str(dst)]
        subprocess.run(cmd, check=True)
        out[ext] = dst.read_bytes()
    return out


@pytest.mark.parametrize(("ext", "kind"), [("mp3", "mp3"), ("flac", "flac"), ("ogg", "ogg/vorbis")])
def test_in_process_without_ffmpeg(encoded: dict[str, bytes], ext: str, kind: str) -> None:
    assert sniff_format(encoded[ext]) == kind
    y = decode_audio(encoded[ext], filename=f"x.{ext}", ffmpeg=None)
    if ext == "flac":  # lossless: sample-exact up to resampling
        _assert_sine(y, 1.0, tol=2e-3)
    else:
        _assert_dominant(y)


def _assert_dominant(y: np.ndarray) -> None:
    # MP3 adds encoder delay/padding; check length and pitch instead of sample alignment.
    assert y.dtype == np.float32 and abs(len(y) - 16_000) < 1_600
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 16_000 / len(y) - FREQ) < 3
    assert 0.3 < np.sqrt(np.mean(y**2)) / (AMP / np.sqrt(2)) < 1.3


@pytest.mark.parametrize(
    ("ext", "kind"), [("opus", "ogg/opus"), ("m4a", "m4a/mp4"), ("webm", "webm/matroska")]
)
def test_other_containers_need_ffmpeg(encoded: dict[str, bytes], ext: str, kind: str) -> None:
    assert sniff_format(encoded[ext]) == kind
    with pytest.raises(AudioError, match=f"{kind} audio needs ffmpeg"):
        decode_audio(encoded[ext], ffmpeg=None)
    _assert_dominant(decode_audio(encoded[ext], ffmpeg=find_ffmpeg()))


def test_m4a_message_without_ffmpeg() -> None:
    fake_m4a = b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + bytes(64)
    with pytest.raises(AudioError) as err:
        decode_audio(fake_m4a, filename="memo.m4a", ffmpeg=None)
    assert "m4a/mp4 audio needs ffmpeg" in str(err.value)
    assert "WAV, MP3, FLAC or OGG" in str(err.value)


def test_find_ffmpeg_matches_path() -> None:
    found = find_ffmpeg()
    if shutil.which("ffmpeg"):
        assert found == shutil.which("ffmpeg")
    elif found is not None:
        assert Path(found).name == "ffmpeg"


BAD_INPUTS = {
    "empty": (b"", "empty"),
    "text": (b"this is not audio at all, just some text\n" * 4, "unrecognised"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
    "truncated wav header": (b"RIFF\x24\x00\x00\x00WAVEfmt ", "corrupt"),
    "zero-length wav": (int_wav(np.zeros(0), 16_000, 2), "zero length"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_audio_error(name: str) -> None:
    data, message = BAD_INPUTS[name]
    with pytest.raises(AudioError, match=message):
        decode_audio(data, ffmpeg=None)


def test_garbage_after_wav_header_is_audio_error() -> None:
    wav = int_wav(_sine(16_000, 0.1), 16_000, 2)
    broken = wav[:20] + b"\xff" * 10 + wav[30:60]
    with pytest.raises(AudioError):
        decode_audio(broken, ffmpeg=None)


def test_corrupt_data_through_ffmpeg(encoded: dict[str, bytes]) -> None:
    broken = encoded["m4a"][:200]
    with pytest.raises(AudioError, match="could not decode"):
        decode_audio(broken, ffmpeg=find_ffmpeg())


def test_non_audio_through_ffmpeg_is_audio_error() -> None:
    ffmpeg = require_tool("ffmpeg")
    with pytest.raises(AudioError):
        decode_audio(b"plain text that ffmpeg cannot read " * 10, ffmpeg=ffmpeg)


def test_missing_ffmpeg_binary_is_audio_error() -> None:
    fake_m4a = b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + bytes(64)
    with pytest.raises(AudioError, match="needs ffmpeg"):
        decode_audio(fake_m4a, ffmpeg="/nonexistent/ffmpeg")


# ---- the length limit, before decoding -------------------------------------------------------


def _refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def decoded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the audio was decoded")

    monkeypatch.setattr(audio, "_decode_in_process", decoded)
    monkeypatch.setattr(audio._FfmpegDecode, "run", decoded)


@pytest.mark.parametrize("ext", ["wav", "mp3", "flac", "ogg", "opus"])
def test_over_the_limit_is_refused_from_the_header(
    encoded: dict[str, bytes], ext: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = int_wav(_sine(44_100, 1.0), 44_100, 2) if ext == "wav" else encoded[ext]
    _refuse_decoding(monkeypatch)
    with pytest.raises(AudioTooLong) as err:
        decode_audio(data, filename=f"a.{ext}", ffmpeg=find_ffmpeg(), max_seconds=0.5)
    assert err.value.seconds == pytest.approx(1.0, abs=0.1) and err.value.limit_s == 0.5
    assert f"(a.{ext}) is 1.0 s long, over this server's limit of 0.5 s" in str(err.value)


def test_a_header_without_a_length_stops_the_decoder_at_the_limit(
    encoded: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audio, "_probe_seconds", lambda ffmpeg, src: None)
    monkeypatch.setattr(audio, "_CHUNK_BYTES", 8 * 1024)
    with pytest.raises(AudioTooLong, match=r"is at least 0\.\d s long"):
        decode_audio(encoded["opus"], ffmpeg=find_ffmpeg(), max_seconds=0.3)
    full = decode_audio(encoded["opus"], ffmpeg=find_ffmpeg(), max_seconds=None)
    _assert_sine(full, 1.0, 0.05)  # read in many small chunks, the same tone


def test_within_the_limit_decodes(encoded: dict[str, bytes]) -> None:
    for ext in ("flac", "opus"):
        _assert_sine(decode_audio(encoded[ext], ffmpeg=find_ffmpeg(), max_seconds=1.5), 1.0, 0.05)


# ---- resampling block by block ---------------------------------------------------------------


@pytest.mark.parametrize("rate", [44_100, 48_000, 22_050, 8_000])
@pytest.mark.parametrize("length", [1, 999, 5_000, 123_457])
def test_block_by_block_resampling_equals_resampling_the_whole_signal(
    rate: int, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scipy.signal import firwin, resample_poly

    monkeypatch.setattr(audio, "_RESAMPLE_BLOCK", 2_000)  # many blocks, odd feeds
    x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    resampler = audio.StreamResampler(rate, expected=length // 2)
    for start in range(0, length, 3_001):
        resampler.feed(x[start : start + 3_001])
    got = resampler.finish()
    g = gcd(audio.SAMPLE_RATE, rate)
    up, down = audio.SAMPLE_RATE // g, rate // g
    wider = max(up, down)
    taps = firwin(2 * 16 * wider + 1, 0.97 / wider, window=("kaiser", 9.0))
    whole = resample_poly(x.astype(np.float64), up, down, window=taps)
    assert got.dtype == np.float32 and got.shape == whole.shape
    np.testing.assert_allclose(got, whole, atol=1e-5)
