"""JSON Lines files (plain or .gz), read one way: the raw corpus (data_prep.sources), data_prep's own
intermediate files, PARus, the reviews and evaluation corpora all open and number their lines here.

  lines(path)    (line number, raw bytes) of every line. Checked at the call, before any line is read:
                 a missing file is FileNotFoundError, a .gz that is not gzip at all NotGzip (an OSError,
                 gzip's own), both naming the file. A gzip that breaks later (truncated, a bad CRC)
                 raises gzip's errors where it breaks, so a lenient caller can keep what came before.
  records(path)  (line number, record) of every line that is a JSON object; anything else is an error
                 naming the file and the line: NotUTF8, or ValueError for bad JSON, a value that is not
                 an object and (need_newline) a last line cut short. Blank lines are skipped unless
                 skip_blank=False (then they are bad JSON: a file we wrote ourselves has none).
How bad lines count instead (the raw corpus: skipped, counted, kept with replacement characters) is
data_prep.sources' policy over lines().
"""
import gzip
import json
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"


class NotGzip(gzip.BadGzipFile):
    """A .gz file that does not start with gzip's magic bytes: a wrong format, not damage."""


class NotUTF8(ValueError):
    """A line that is not valid UTF-8 (the message names the file and the line)."""


def lines(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    gz = path.suffix == ".gz"
    if gz:
        with open(path, "rb") as f:
            head = f.read(2)
        if head and head != GZIP_MAGIC:  # judged up front, so a later gzip error is damage, not a wrong format
            raise NotGzip(f"{path}: not a gzip file (starts with {head!r}, not {GZIP_MAGIC!r})")
    return _lines(path, gz)


def _lines(path: Path, gz: bool):
    with (gzip.open if gz else open)(path, "rb") as f:
        yield from enumerate(f, 1)


def records(path, skip_blank: bool = True, need_newline: bool = False):
    return _records(Path(path), lines(path), skip_blank, need_newline)


def _records(path: Path, numbered, skip_blank: bool, need_newline: bool):
    for n, raw in numbered:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotUTF8(f"{path}:{n}: not UTF-8 ({e})") from None
        if skip_blank and not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        if need_newline and not raw.endswith(b"\n"):
            raise ValueError(f"{path}:{n}: ends without a newline (truncated)")
        yield n, rec
