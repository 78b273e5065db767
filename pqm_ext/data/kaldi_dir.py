"""Kaldi-style data directories: reading, writing and validation (Kaldi's validate_data_dir in spirit).

A data dir has one line per id in each file, sorted in C-locale (byte) order, ids unique:

  wav.scp          <utt or recording> <path>        recording ids when ``segments`` exists
  segments         <utt> <recording> <start> <end>  seconds (optional)
  text             <utt> <normalised transcript>    see pqm_ext.data.text
  utt2spk          <utt> <speaker>
  spk2utt          <speaker> <utt> <utt> ...
  utt2num_samples  <utt> <number of samples>         optional (written by format_data_dir)
  spk2gender       <speaker> m|f                    optional

Utterance ids start with their speaker id, so sorting by utterance keeps speakers together (Kaldi's
convention, checked here). wav.scp holds plain paths only: pipes are not supported.
Every problem found is raised as an InputError that names the file and the line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

from pqm_ext.data.audio import audio_info, read_audio
from pqm_ext.data.text import is_normalised
from pqm_ext.utils.errors import InputError

PathLike = Union[str, Path]
REQUIRED_FILES = ("wav.scp", "text", "utt2spk", "spk2utt")
CHECK_AUDIO = ("none", "header", "decode")
SAMPLE_RATE = 16000
# Segment ends may overrun the recording by this much (stm times are rounded; Kaldi allows the same).
END_TOLERANCE_S = 0.5


@dataclass(frozen=True)
class Segment:
    recording: str
    start: float
    end: float


def format_time(seconds: float) -> str:
    """Seconds as the shortest decimal with millisecond precision ("12.5", "3")."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


@dataclass
class DataDir:
    """An in-memory data dir; ``write`` produces the files described in the module docstring."""

    wav_scp: Dict[str, str]
    text: Dict[str, str]
    utt2spk: Dict[str, str]
    segments: Optional[Dict[str, Segment]] = None
    utt2num_samples: Optional[Dict[str, int]] = None
    spk2gender: Optional[Dict[str, str]] = field(default=None)

    @property
    def utts(self) -> List[str]:
        return sorted(self.utt2spk)

    @property
    def speakers(self) -> List[str]:
        return sorted(set(self.utt2spk.values()))

    def spk2utt(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for utt in self.utts:
            out.setdefault(self.utt2spk[utt], []).append(utt)
        return out

    def subset(self, utts: Iterable[str]) -> "DataDir":
        """The data dir restricted to ``utts`` (and the recordings and speakers they use)."""
        keep = sorted(set(utts))
        segments = None
        if self.segments is not None:
            segments = {u: self.segments[u] for u in keep}
            recordings = {s.recording for s in segments.values()}
        else:
            recordings = set(keep)
        speakers = {self.utt2spk[u] for u in keep}
        return DataDir(
            wav_scp={r: p for r, p in self.wav_scp.items() if r in recordings},
            text={u: self.text[u] for u in keep},
            utt2spk={u: self.utt2spk[u] for u in keep},
            segments=segments,
            utt2num_samples=None if self.utt2num_samples is None else {u: self.utt2num_samples[u] for u in keep},
            spk2gender=None if self.spk2gender is None else {s: g for s, g in self.spk2gender.items() if s in speakers},
        )

    def write(self, path: PathLike) -> None:
        """Write the files into the existing directory ``path`` (callers make it atomic)."""
        path = Path(path)

        def put(name: str, rows: Dict[str, str]) -> None:
            with open(path / name, "w", encoding="utf-8") as f:
                for key in sorted(rows):
                    f.write(f"{key} {rows[key]}\n")

        put("wav.scp", self.wav_scp)
        put("text", self.text)
        put("utt2spk", self.utt2spk)
        put("spk2utt", {s: " ".join(us) for s, us in self.spk2utt().items()})
        if self.segments is not None:
            put("segments", {u: f"{s.recording} {format_time(s.start)} {format_time(s.end)}"
                             for u, s in self.segments.items()})
        if self.utt2num_samples is not None:
            put("utt2num_samples", {u: str(n) for u, n in self.utt2num_samples.items()})
        if self.spk2gender is not None:
            put("spk2gender", self.spk2gender)


@dataclass(frozen=True)
class Row:
    line: int
    key: str
    value: str


def numbered_lines(path: PathLike) -> Iterator[Tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file; a line that is not UTF-8 is an
    InputError naming the file and line (a corpus file with one stray Latin-1 byte is common)."""
    path = Path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InputError(path, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})", n) from None


def read_table(path: PathLike, what: str = "value") -> Dict[str, Row]:
    """Read ``<key> <value>`` lines, checking that keys are unique, sorted and have a value."""
    path = Path(path)
    rows: Dict[str, Row] = {}
    previous = None
    for n, line in numbered_lines(path):
        parts = line.split(maxsplit=1)
        if not parts:
            raise InputError(path, "empty line", n)
        key = parts[0]
        value = parts[1].strip() if len(parts) > 1 else ""
        if not value:
            raise InputError(path, f"'{key}' has no {what}", n)
        if key in rows:
            raise InputError(path, f"duplicate id '{key}' (first on line {rows[key].line})", n)
        if previous is not None and key < previous:
            raise InputError(path, f"not sorted in C-locale order: '{key}' after '{previous}' "
                                   f"(sort with LC_ALL=C sort)", n)
        rows[key] = Row(n, key, value)
        previous = key
    return rows


def _first_missing(rows: Dict[str, Row], others: Iterable[str]) -> Optional[Row]:
    others = set(others)
    for row in rows.values():
        if row.key not in others:
            return row
    return None


def read_data_dir(path: PathLike, check_text: bool = True) -> DataDir:
    """Read and cross-check the files of a data dir (no audio is opened)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "data directory does not exist")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise InputError(path / name, "missing (a data dir needs wav.scp, text, utt2spk and spk2utt)")
    text_rows = read_table(path / "text", "transcript (empty transcript)")
    utt2spk_rows = read_table(path / "utt2spk", "speaker")
    wav_rows = read_table(path / "wav.scp", "audio path")
    spk2utt_rows = read_table(path / "spk2utt", "utterance")

    for row in utt2spk_rows.values():
        if len(row.value.split()) != 1:
            raise InputError(path / "utt2spk", f"'{row.key}' must have exactly one speaker", row.line)
        if not row.key.startswith(row.value):
            raise InputError(path / "utt2spk", f"utterance id '{row.key}' does not start with its speaker "
                                               f"id '{row.value}'", row.line)
    row = _first_missing(utt2spk_rows, text_rows)
    if row:
        raise InputError(path / "utt2spk", f"utterance '{row.key}' has no line in text", row.line)
    row = _first_missing(text_rows, utt2spk_rows)
    if row:
        raise InputError(path / "text", f"utterance '{row.key}' has no line in utt2spk", row.line)
    if check_text:
        for row in text_rows.values():
            if not is_normalised(row.value):
                raise InputError(path / "text", f"transcript of '{row.key}' is not normalised "
                                                f"(upper-case words of A-Z and apostrophes)", row.line)
    # Sorting by utterance must also sort by speaker, otherwise speakers are not contiguous.
    last_spk, last_row = None, None
    for row in utt2spk_rows.values():
        if last_spk is not None and row.value < last_spk:
            raise InputError(path / "utt2spk", f"speaker '{row.value}' of '{row.key}' sorts before speaker "
                                               f"'{last_spk}' of the previous utterance '{last_row}'", row.line)
        last_spk, last_row = row.value, row.key

    utt2spk = {k: r.value for k, r in utt2spk_rows.items()}
    seen: Dict[str, int] = {}
    for row in spk2utt_rows.values():
        for utt in row.value.split():
            if utt2spk.get(utt) != row.key:
                raise InputError(path / "spk2utt", f"'{utt}' is listed under speaker '{row.key}' but utt2spk "
                                                   f"says {utt2spk.get(utt)!r}", row.line)
            if utt in seen:
                raise InputError(path / "spk2utt", f"'{utt}' listed twice (also on line {seen[utt]})", row.line)
            seen[utt] = row.line
    missing = sorted(set(utt2spk) - set(seen))
    if missing:
        raise InputError(path / "spk2utt", f"utterance '{missing[0]}' of utt2spk is not listed "
                                           f"({len(missing)} missing)")

    for row in wav_rows.values():
        if row.value.endswith("|") or len(row.value.split()) != 1:
            raise InputError(path / "wav.scp", "only plain audio paths are supported (no pipes or spaces)",
                             row.line)
    segments = None
    if (path / "segments").is_file():
        segments = {}
        for row in read_table(path / "segments", "recording/start/end").values():
            fields = row.value.split()
            if len(fields) != 3:
                raise InputError(path / "segments", "expected '<utt> <recording> <start> <end>'", row.line)
            try:
                start, end = float(fields[1]), float(fields[2])
            except ValueError:
                raise InputError(path / "segments", "start and end must be numbers", row.line) from None
            if not 0 <= start < end:
                raise InputError(path / "segments", f"bad times {start} {end} (need 0 <= start < end)", row.line)
            if fields[0] not in wav_rows:
                raise InputError(path / "segments", f"recording '{fields[0]}' is not in wav.scp", row.line)
            if row.key not in utt2spk:
                raise InputError(path / "segments", f"utterance '{row.key}' has no line in utt2spk", row.line)
            segments[row.key] = Segment(fields[0], start, end)
        missing = sorted(set(utt2spk) - set(segments))
        if missing:
            raise InputError(path / "segments", f"utterance '{missing[0]}' has no segment "
                                                f"({len(missing)} missing)")
        unused = set(wav_rows) - {s.recording for s in segments.values()}
        if unused:
            logging.warning("%s: %d recordings have no segment (e.g. %s)", path / "wav.scp", len(unused),
                            sorted(unused)[0])
    else:
        row = _first_missing(utt2spk_rows, wav_rows)
        if row:
            raise InputError(path / "utt2spk", f"utterance '{row.key}' has no line in wav.scp", row.line)
        row = _first_missing(wav_rows, utt2spk_rows)
        if row:
            raise InputError(path / "wav.scp", f"'{row.key}' has no line in utt2spk", row.line)

    utt2num_samples = None
    if (path / "utt2num_samples").is_file():
        utt2num_samples = {}
        for row in read_table(path / "utt2num_samples", "number of samples").values():
            if not row.value.isdigit() or int(row.value) <= 0:
                raise InputError(path / "utt2num_samples", "expected a positive integer", row.line)
            if row.key not in utt2spk:
                raise InputError(path / "utt2num_samples", f"utterance '{row.key}' has no line in utt2spk",
                                 row.line)
            utt2num_samples[row.key] = int(row.value)
        missing = sorted(set(utt2spk) - set(utt2num_samples))
        if missing:
            raise InputError(path / "utt2num_samples", f"utterance '{missing[0]}' is missing")

    spk2gender = None
    if (path / "spk2gender").is_file():
        spk2gender = {}
        speakers = set(utt2spk.values())
        for row in read_table(path / "spk2gender", "gender").values():
            if row.value not in ("m", "f"):
                raise InputError(path / "spk2gender", f"gender must be 'm' or 'f', not {row.value!r}", row.line)
            spk2gender[row.key] = row.value
        missing = sorted(speakers - set(spk2gender))
        if missing:
            raise InputError(path / "spk2gender", f"speaker '{missing[0]}' is missing")

    return DataDir(
        wav_scp={k: r.value for k, r in wav_rows.items()},
        text={k: r.value for k, r in text_rows.items()},
        utt2spk=utt2spk,
        segments=segments,
        utt2num_samples=utt2num_samples,
        spk2gender=spk2gender,
    )


def check_audio_files(data: DataDir, wav_scp_path: Optional[PathLike], mode: str = "header",
                      sample_rate: int = SAMPLE_RATE, allow_resample: bool = False,
                      remap: Optional[Tuple[str, str]] = None) -> None:
    """Open every recording of ``data``: readable, ``sample_rate`` (unless resampling is allowed),
    long enough for its segments and matching utt2num_samples. ``mode`` "decode" reads every sample
    (catches truncated files), "header" only the header. Errors name ``wav_scp_path`` and its line, or
    the audio file itself when ``wav_scp_path`` is None (a dir that is not written yet)."""
    if mode not in CHECK_AUDIO:
        raise ValueError(f"check_audio must be one of {CHECK_AUDIO}, not {mode!r}")
    if mode == "none":
        return
    lines = {k: n for n, k in enumerate(sorted(data.wav_scp), 1)}

    def fail(rec: str, audio_path: str, message: str) -> InputError:
        if wav_scp_path is None:
            return InputError(audio_path, message)
        return InputError(wav_scp_path, f"recording '{rec}' ({audio_path}): {message}", lines[rec])

    ends: Dict[str, Tuple[float, str]] = {}
    if data.segments is not None:
        for utt, seg in data.segments.items():
            if seg.end > ends.get(seg.recording, (0.0, ""))[0]:
                ends[seg.recording] = (seg.end, utt)
    for rec, audio_path in data.wav_scp.items():
        if remap is not None and audio_path.startswith(remap[0]):
            audio_path = remap[1] + audio_path[len(remap[0]):]
        try:
            info = audio_info(audio_path)
            num_frames, rate = info.num_frames, info.sample_rate
            if mode == "decode":
                samples, rate = read_audio(audio_path, dtype="int16")
                num_frames = len(samples)
        except InputError as e:
            where = e.path if e.line is None else f"{e.path}:{e.line}"
            raise fail(rec, audio_path, str(e)[len(where) + 2:]) from None
        if rate != sample_rate and not allow_resample:
            raise fail(rec, audio_path, f"sample rate {rate}, expected {sample_rate}")
        if rec in ends and ends[rec][0] > num_frames / rate + END_TOLERANCE_S:
            raise fail(rec, audio_path, f"segment '{ends[rec][1]}' ends at {ends[rec][0]} s, after the end of "
                                        f"the recording ({num_frames / rate:.2f} s)")
        if data.segments is None and data.utt2num_samples is not None:
            if data.utt2num_samples[rec] != num_frames:
                raise fail(rec, audio_path, f"{num_frames} samples but utt2num_samples says "
                                            f"{data.utt2num_samples[rec]}")


def validate_data_dir(path: PathLike, check_audio: str = "header", sample_rate: int = SAMPLE_RATE,
                      allow_resample: bool = False, check_text: bool = True,
                      remap: Optional[Tuple[str, str]] = None) -> DataDir:
    """Validate the data dir at ``path`` and return it; raises InputError (file:line: message).

    ``remap`` = (old_prefix, new_prefix) rewrites audio paths before opening them, so that a dir written
    in a temporary location with its final absolute paths can be checked before it is renamed.
    """
    data = read_data_dir(path, check_text=check_text)
    check_audio_files(data, Path(path) / "wav.scp", check_audio, sample_rate, allow_resample, remap)
    logging.info("%s: valid (%d utterances, %d speakers, %d recordings)", path, len(data.utt2spk),
                 len(data.speakers), len(data.wav_scp))
    return data
