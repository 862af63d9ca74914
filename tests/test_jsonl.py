"""gmlib.jsonl: the one JSONL reader. Strict records name the file and line of any damage; lines()
judges a file before reading it (missing, not gzip), so a lenient caller can count the rest."""
import gzip

import pytest

from gmlib import jsonl


def test_records_numbers_lines_and_names_damage(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"a": 2}\n')
    assert list(jsonl.records(p)) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not valid JSON"):
        list(jsonl.records(p, skip_blank=False))
    p.write_bytes(b'{"a": 1}\n[1]\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: expected a JSON object, got list"):
        list(jsonl.records(p))
    p.write_bytes(b'{"a": 1}\n{"a": 2}')
    assert len(list(jsonl.records(p))) == 2
    with pytest.raises(ValueError, match=r"a\.jsonl:2: ends without a newline"):
        list(jsonl.records(p, need_newline=True))
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(jsonl.NotUTF8, match=r"a\.jsonl:1: not UTF-8"):
        list(jsonl.records(p))


def test_lines_judges_the_file_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        jsonl.lines(tmp_path / "nope.jsonl")
    (tmp_path / "plain.jsonl.gz").write_text('{"a": 1}\n')
    with pytest.raises(jsonl.NotGzip, match="plain.jsonl.gz: not a gzip file"):
        jsonl.lines(tmp_path / "plain.jsonl.gz")
    with gzip.open(tmp_path / "z.jsonl.gz", "wb") as f:
        f.write(b'{"a": 1}\n{"a": 2}\n')
    assert [n for n, _ in jsonl.lines(tmp_path / "z.jsonl.gz")] == [1, 2]
    assert list(jsonl.records(tmp_path / "z.jsonl.gz")) == [(1, {"a": 1}), (2, {"a": 2})]
