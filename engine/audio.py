"""Audio decoding for speech-to-text: bytes in, float32 mono 16 kHz samples out.

WAV, MP3, FLAC and Ogg Vorbis are decoded in-process with miniaudio at their native rate a block
at a time, down-mixed and resampled block by block with a polyphase filter
(scipy.signal.resample_poly, `StreamResampler`) in float32 into one buffer sized from the
header, so they too peak near the float32 size of the samples. Everything
else (m4a/mp4, webm, Ogg Opus, AIFF, ...) goes through the ffmpeg binary when one is given, its
output read in chunks straight into one float32 buffer (sized from the probed duration), so
decoding peaks near the float32 size of the samples.
The container is sniffed from the leading bytes; the filename is only used in messages.
Audio longer than `max_seconds` is refused from the file's header before anything is decoded
where the header says its length, else as soon as the decoder passes the limit.
No MLX here. Every failure is an `AudioError` with a message fit for the client.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from math import gcd
from pathlib import Path

import miniaudio
import numpy as np

SAMPLE_RATE = 16_000
MIN_SAMPLES = SAMPLE_RATE // 100  # 10 ms: anything shorter is a broken file, not speech
FFMPEG_TIMEOUT_S = 600.0
MAX_AUDIO_SECONDS = 4 * 3600.0  # the default of --stt-max-audio-seconds
_CHUNK_BYTES = 1 << 20  # ffmpeg output read per step: 64 Ki stereo float32 frames
_STREAM_FRAMES = 1 << 16  # frames miniaudio decodes per step
_RESAMPLE_BLOCK = 1 << 18  # input samples resampled per step (about 6 s at 44.1 kHz)
_DURATION = re.compile(rb"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
_EXTRA_FFMPEG_DIRS = ("/opt/homebrew/bin", "/usr/local/bin")
_IN_PROCESS = ("wav", "wav (RF64)", "mp3", "flac", "ogg/vorbis")
_NOT_AUDIO = {
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"\x7fELF": "an executable",
}
_NEEDS_FFMPEG_HINT = "install it (brew install ffmpeg) or send WAV, MP3, FLAC or OGG"


class AudioError(ValueError):
    """Audio the server cannot use; the message is meant for the client (HTTP 400)."""


class AudioTooLong(AudioError):
    """Audio over the length limit, found from its header or while decoding (HTTP 413)."""

    def __init__(self, label: str, seconds: float, limit_s: float, *, at_least: bool) -> None:
        length = f"at least {seconds:.1f} s" if at_least else f"{seconds:.1f} s"
        super().__init__(
            f"the audio{label} is {length} long, over this server's limit of {limit_s:g} s"
        )
        self.seconds = seconds
        self.limit_s = limit_s


def audio_duration_s(samples: np.ndarray) -> float:
    """Length in seconds of 16 kHz samples."""
    return float(len(samples)) / SAMPLE_RATE


def find_ffmpeg() -> str | None:
    """Path of an ffmpeg binary on PATH or in Homebrew's usual prefixes, else None."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    for folder in _EXTRA_FFMPEG_DIRS:
        candidate = Path(folder) / "ffmpeg"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def decode_audio(
    data: bytes,
    *,
    filename: str | None = None,
    ffmpeg: str | None = None,
    max_seconds: float | None = MAX_AUDIO_SECONDS,
) -> np.ndarray:
    """Decode an uploaded file to float32 mono samples at 16 kHz.

    Raises AudioTooLong past `max_seconds` (None or 0: no limit), AudioError (a ValueError) for
    empty, zero-length, corrupt, non-audio or unsupported input; never lets a decoder's own
    exception escape.
    """
    label = f" ({filename})" if filename else ""
    if not data:
        raise AudioError(f"the audio file{label} is empty")
    kind = sniff_format(data)
    limit = _Limit(label, max_seconds or None)
    try:
        if kind in _IN_PROCESS:
            limit.check(_in_process_seconds(data, kind))
            samples = _decode_in_process(data, kind, label)
        else:
            samples = _decode_with_ffmpeg(data, kind, label, ffmpeg, limit)
    except AudioError:
        raise
    except Exception as exc:  # a decoder fault must become a client error, never a 500
        raise AudioError(f"could not decode the {kind} audio{label}: {exc}") from exc
    if samples.size == 0:
        raise AudioError(f"the {kind} audio{label} contains no samples (zero length)")
    if samples.size < MIN_SAMPLES:
        ms = samples.size * 1000 / SAMPLE_RATE
        raise AudioError(f"the {kind} audio{label} is {ms:.1f} ms long: truncated or corrupt")
    limit.check(audio_duration_s(samples))
    return samples


class _Limit:
    """The length limit of one decode (None: none)."""

    def __init__(self, label: str, seconds: float | None) -> None:
        self.label = label
        self.seconds = seconds
        self.samples = None if seconds is None else int(seconds * SAMPLE_RATE)

    def check(self, seconds: float | None, *, at_least: bool = False) -> None:
        if self.seconds is not None and seconds is not None and seconds > self.seconds:
            raise AudioTooLong(self.label, seconds, self.seconds, at_least=at_least)


def _in_process_seconds(data: bytes, kind: str) -> float | None:
    """The length the header gives (MP3: counted frame by frame, nothing kept); None if the
    header cannot be read (decoding then says what is wrong)."""
    info = {
        "mp3": miniaudio.mp3_get_info,
        "flac": miniaudio.flac_get_info,
        "ogg/vorbis": miniaudio.vorbis_get_info,
    }.get(kind, miniaudio.wav_get_info)
    try:
        found = info(data)
    except miniaudio.MiniaudioError:
        return None
    if found.sample_rate <= 0:
        return None
    return found.num_frames / found.sample_rate


def sniff_format(data: bytes) -> str:
    """Name the container from its magic bytes ("wav", "mp3", "flac", "ogg/vorbis", ...)."""
    head = data[:64]
    if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] in (b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav (RF64)"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return _sniff_ogg(data)
    if head[:3] == b"ID3":
        return _sniff_after_id3(data)
    if head[4:8] == b"ftyp":
        return "mov" if head[8:12] == b"qt  " else "m4a/mp4"
    return _sniff_other(head)


def _sniff_ogg(data: bytes) -> str:
    # The first page holds the codec's identification header right after the segment table.
    if len(data) < 28:
        return "ogg (truncated)"
    body = data[27 + data[26] : 27 + data[26] + 8]
    if body.startswith(b"\x01vorbis"):
        return "ogg/vorbis"
    if body.startswith(b"OpusHead"):
        return "ogg/opus"
    if body.startswith(b"\x7fFLAC"):
        return "ogg/flac"
    if body.startswith(b"Speex"):
        return "ogg/speex"
    return "ogg (unknown codec)"


def _sniff_after_id3(data: bytes) -> str:
    if len(data) < 10:
        return "mp3"
    size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | data[9] & 0x7F
    after = data[10 + size : 10 + size + 64]
    if after[:4] == b"fLaC":
        return "flac"
    if len(after) >= 2 and after[0] == 0xFF and after[1] & 0xF6 == 0xF0:
        return "aac (ADTS)"
    return "mp3"


def _sniff_other(head: bytes) -> str:
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm/matroska"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"caff":
        return "caf"
    if head[:5] == b"#!AMR":
        return "amr"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "wma/asf"
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:
            return "aac (ADTS)"
        if head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
            return "mp3"
    if head[:3] == b"\xff\xd8\xff":
        return "a JPEG image"
    for magic, name in _NOT_AUDIO.items():
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF":
        return f"RIFF/{head[8:12].decode('latin-1').strip() or '?'} (not WAVE)"
    return "unknown"


def _decode_in_process(data: bytes, kind: str, label: str) -> np.ndarray:
    try:
        rate, channels, frames = _native_format(data, kind)
        if rate <= 0 or channels <= 0:
            raise AudioError(f"the {kind} audio{label} has an invalid sample rate or channel count")
        resampler = StreamResampler(rate, expected=frames)
        for block in _decoded_blocks(data, rate, channels):
            resampler.feed(block)
        return resampler.finish()
    except miniaudio.MiniaudioError as exc:
        raise AudioError(
            f"could not decode the {kind} audio{label}: the file is corrupt or truncated"
        ) from exc


def _native_format(data: bytes, kind: str) -> tuple[int, int, int]:
    """Sample rate, channels and frames (as the header says) of an in-process format."""
    info = {
        "mp3": miniaudio.mp3_get_info,
        "flac": miniaudio.flac_get_info,
        "ogg/vorbis": miniaudio.vorbis_get_info,
    }.get(kind, miniaudio.wav_get_info)(data)
    return info.sample_rate, info.nchannels, max(0, info.num_frames)


def _decoded_blocks(data: bytes, rate: int, channels: int) -> Iterator[np.ndarray]:
    """Mono float32 blocks at the native rate: the file is decoded a block at a time, never
    held whole (nor widened) in memory."""
    stream = miniaudio.stream_memory(
        data,
        output_format=miniaudio.SampleFormat.FLOAT32,
        nchannels=channels,
        sample_rate=rate,
        frames_to_read=_STREAM_FRAMES,
    )
    for chunk in stream:
        frames = np.frombuffer(chunk, dtype=np.float32)
        frames = frames[: frames.size // channels * channels].reshape(-1, channels)
        mono = frames.mean(axis=1, dtype=np.float32) if channels > 1 else frames[:, 0]
        yield np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)


class StreamResampler:
    """Polyphase windowed-sinc resampling to 16 kHz, fed block by block, in float32.

    The filter has the parameters of ffmpeg's default resampler (16 taps a side, Kaiser beta 9,
    cutoff 0.97 of Nyquist), so the samples match what mlx_whisper's own ffmpeg-based loader
    feeds the model (RMS difference ~5e-5 on speech, against ~8e-4 with scipy's default filter:
    enough to change a word now and then). Each block of input is resampled with `margin`
    samples of real context on both sides and starts at a multiple of `down`, so its outputs
    are exactly those of resampling the whole signal at once; memory stays a few blocks plus
    the output (float32, preallocated growth).
    """

    def __init__(self, rate: int, *, expected: int = 0) -> None:
        """`expected`: the input length the header gives (sizes the output once; may be off)."""
        from scipy.signal import firwin

        g = gcd(SAMPLE_RATE, rate)
        self.up, self.down = SAMPLE_RATE // g, rate // g
        wider = max(self.up, self.down)
        taps = firwin(2 * 16 * wider + 1, 0.97 / wider, window=("kaiser", 9.0))
        self.taps = taps.astype(np.float32)
        reach = len(taps) // 2 // self.up + 2  # input samples the filter sees on each side
        self.margin = -(-reach // self.down) * self.down
        self.block = self.down * max(1, _RESAMPLE_BLOCK // self.down)
        self.pending = np.zeros(0, np.float32)  # input from `start - left` on
        self.start = 0  # the next input sample to resample (a multiple of `down`)
        self.left = 0  # context kept before `start` (margin, less at the signal's start)
        self.out = _Growing(-(-expected * self.up // self.down))

    def feed(self, samples: np.ndarray) -> None:
        if self.up == self.down:
            self.out.extend(samples)
            return
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        while self.pending.size >= self.left + self.block + self.margin:
            self._resample(self.left + self.block + self.margin, self.block)

    def finish(self) -> np.ndarray:
        if self.up != self.down and self.pending.size > self.left:
            self._resample(self.pending.size, self.pending.size - self.left)
        return self.out.array()

    def _resample(self, upto: int, count: int) -> None:
        from scipy.signal import resample_poly

        segment = self.pending[:upto]
        y = resample_poly(segment, self.up, self.down, window=self.taps)
        first = self.left * self.up // self.down
        self.out.extend(y[first : first + -(-count * self.up // self.down)])
        self.start += count
        keep_from = self.left + count - self.margin
        self.left = min(self.margin, self.start)
        self.pending = self.pending[max(0, keep_from) :].copy()


class _Growing:
    """A float32 array grown in place (amortised past its initial capacity), returned as a
    view of what was written (a copy would double the peak for a little slack)."""

    def __init__(self, capacity: int = 0) -> None:
        self.data = np.empty(capacity, np.float32)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + values.size
        if end > self.data.size:
            self.data = np.resize(self.data, max(end, self.data.size + self.data.size // 4))
        self.data[self.size : end] = values
        self.size = end

    def array(self) -> np.ndarray:
        return self.data[: self.size]


def _decode_with_ffmpeg(
    data: bytes, kind: str, label: str, ffmpeg: str | None, limit: _Limit
) -> np.ndarray:
    if kind.startswith(("a ", "an ")):
        raise AudioError(f"the uploaded file{label} is {kind}, not audio")
    if ffmpeg is None:
        if kind == "unknown":
            raise AudioError(
                f"unrecognised audio format{label}: send WAV, MP3, FLAC or OGG "
                "(other formats need ffmpeg: brew install ffmpeg)"
            )
        raise AudioError(f"{kind} audio needs ffmpeg: {_NEEDS_FFMPEG_HINT}")
    # A temporary file, not a pipe: MP4/M4A often keep their index (moov) at the end and
    # ffmpeg cannot seek back on a pipe.
    with tempfile.TemporaryDirectory(prefix="mlxd-audio-") as tmp:
        src = Path(tmp) / "input"
        src.write_bytes(data)
        seconds = _probe_seconds(ffmpeg, src)
        limit.check(seconds)
        return _FfmpegDecode(ffmpeg, src, kind, label, limit).run(seconds)


def _probe_seconds(ffmpeg: str, src: Path) -> float | None:
    """The duration ffmpeg reads from the container's header (Ogg: the last page's position),
    without decoding; None when it does not say."""
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-i", str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _DURATION.search(proc.stderr)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


class _FfmpegDecode:
    """One ffmpeg run, its output mixed to mono chunk by chunk into a float32 buffer."""

    def __init__(self, ffmpeg: str, src: Path, kind: str, label: str, limit: _Limit) -> None:
        self.ffmpeg, self.src, self.kind, self.label, self.limit = ffmpeg, src, kind, label, limit
        self.timed_out = False

    def run(self, seconds: float | None) -> np.ndarray:
        # Stereo out, averaged here: the same (L+R)/2 mix as in-process decoding. (`-ac 1` would
        # sum at +3 dB, so a loud stereo file would clip.)
        cmd = [
            self.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0",
            "-i", str(self.src), "-vn", "-f", "f32le", "-acodec", "pcm_f32le",
            "-ac", "2", "-ar", str(SAMPLE_RATE), "pipe:1",
        ]  # fmt: skip
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors)
            except FileNotFoundError as exc:
                message = f"{self.kind} audio needs ffmpeg, which was not found at {self.ffmpeg}"
                raise AudioError(message) from exc
            timer = threading.Timer(FFMPEG_TIMEOUT_S, self._expire, (proc,))
            timer.start()
            try:
                samples = self._read(proc, _capacity(seconds, self.limit.samples))
            finally:
                timer.cancel()
                proc.kill()
                proc.wait()
            if self.timed_out:
                raise AudioError(f"decoding the {self.kind} audio{self.label} took too long")
            errors.seek(0)
            self._check_exit(proc.returncode, errors.read())
        return samples

    def _expire(self, proc: subprocess.Popen) -> None:
        self.timed_out = True
        proc.kill()

    def _read(self, proc: subprocess.Popen, capacity: int) -> np.ndarray:
        out = _Growing(capacity)
        assert proc.stdout is not None
        while chunk := proc.stdout.read(_CHUNK_BYTES):
            stereo = np.frombuffer(chunk[: len(chunk) // 8 * 8], dtype="<f4").reshape(-1, 2)
            if self.limit.samples is not None and out.size + len(stereo) > self.limit.samples:
                self.limit.check((out.size + len(stereo)) / SAMPLE_RATE, at_least=True)
            out.extend(stereo.mean(axis=1, dtype=np.float64))
        proc.wait()
        return out.array()

    def _check_exit(self, code: int, stderr: bytes) -> None:
        if code != 0:
            reason = _last_line(stderr, str(self.src)) or f"ffmpeg exited with status {code}"
            what = "file" if self.kind == "unknown" else f"{self.kind} audio"
            raise AudioError(f"could not decode the {what}{self.label}: {reason}")


def _capacity(seconds: float | None, limit: int | None) -> int:
    """Samples to allocate up front: the probed length and a second, within the limit."""
    guess = int(((seconds or 0.0) + 1.0) * SAMPLE_RATE) if seconds else 60 * SAMPLE_RATE
    return min(guess, limit + 1) if limit is not None else guess


def _last_line(stderr: bytes, src: str) -> str:
    text = stderr.decode("utf-8", "replace").replace(f"{src}: ", "").replace(src, "input")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
