"""The source registry and the loader: local files, download over loopback HTTP, bad input."""
import functools
import gzip
import http.server
import json
import threading

import pytest

from data_prep import sources
from data_prep.sources import CORPUS, ROLES, SOURCES, ReadStats, SourceError, iter_records, locate


def _write_gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode("utf-8"))
    return path


def _rec(text, i=0):
    return json.dumps({"id": f"x-{i}", "source": "x", "text": text}, ensure_ascii=False)


def test_registry_matches_sources_md():
    assert len(CORPUS) == 23 and CORPUS == sorted(CORPUS)
    assert all(SOURCES[s].role in ROLES and SOURCES[s].license and "/" in SOURCES[s].repo for s in CORPUS)
    assert SOURCES["news_rt"].relpath == "corpus/news_rt/news_rt.jsonl.gz"
    assert SOURCES["reviews_wildberries"].kind == "reviews" and SOURCES["parus_val"].kind == "eval"
    assert {SOURCES[s].role for s in CORPUS} == set(ROLES)


def test_real_source_reads(real_docs):
    root = sources.data_dir()
    st = ReadStats()
    recs = list(iter_records(locate("wiki_articles_xlplagiarism", root=root), stats=st))
    assert len(recs) == st.docs == 18 and st.bad_json == st.no_text == st.truncated == 0


def test_bad_lines_are_counted_not_fatal(tmp_path):
    p = _write_gz(tmp_path / "a.jsonl.gz", [
        _rec("первый", 0),
        "not json at all",
        json.dumps({"id": "no-text"}),
        json.dumps({"text": 5}),
        b'{"text": "\xff\xfe bad bytes"}\n',
        "",
        _rec("последний", 5)])
    st = ReadStats()
    texts = [r["text"] for r in iter_records(p, stats=st)]
    assert texts == ["первый", "\ufffd\ufffd bad bytes", "последний"]
    assert (st.lines, st.docs, st.bad_json, st.no_text, st.undecodable_lines) == (7, 3, 1, 2, 1)
    assert any("a.jsonl.gz:2" in e for e in st.errors)  # messages name the file and line


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    p = _write_gz(tmp_path / "t.jsonl.gz", [_rec("слово " * 2000, i) for i in range(50)])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    st = ReadStats()
    recs = list(iter_records(p, stats=st))
    assert st.truncated == 1 and 0 < len(recs) < 50
    assert all(r["text"] == "слово " * 2000 for r in recs)  # every record returned is whole


def test_empty_files(tmp_path):
    zero = tmp_path / "zero.jsonl.gz"
    zero.write_bytes(b"")
    st = ReadStats()
    assert list(iter_records(zero, stats=st)) == [] and st.empty_file == 1
    empty_stream = _write_gz(tmp_path / "empty.jsonl.gz", [])
    st = ReadStats()
    assert list(iter_records(empty_stream, stats=st)) == [] and st.empty_file == 1


def test_missing_and_not_gzip_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="nope.jsonl.gz"):
        list(iter_records(tmp_path / "nope.jsonl.gz"))
    bad = tmp_path / "plain.jsonl.gz"
    bad.write_text(_rec("не gzip"))
    with pytest.raises(SourceError, match="plain.jsonl.gz.*not a gzip"):
        list(iter_records(bad))
    with pytest.raises(SourceError, match="news_rt"):
        locate("news_rt", root=tmp_path, base_url=None)
    with pytest.raises(KeyError, match="no_such_source"):
        locate("no_such_source", root=tmp_path)


def test_max_bytes_stops_early(tmp_path):
    p = _write_gz(tmp_path / "m.jsonl.gz", [_rec("абв", i) for i in range(100)])  # 6 bytes each
    assert len(list(iter_records(p, max_bytes=30))) == 5


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/served (no internet needed)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_download_when_not_local(tmp_path, http_root):
    served, url = http_root
    _write_gz(served / SOURCES["wiki_ud_gsd"].relpath, [_rec("Скачанный документ.", 0)])
    cache = tmp_path / "cache"
    p = locate("wiki_ud_gsd", root=tmp_path / "nothing_here", base_url=url, cache_dir=cache)
    assert p == cache / SOURCES["wiki_ud_gsd"].relpath
    assert [r["text"] for r in iter_records(p)] == ["Скачанный документ."]
    # a second call uses the cache even when the server no longer has the file
    (served / SOURCES["wiki_ud_gsd"].relpath).unlink()
    assert locate("wiki_ud_gsd", root=tmp_path / "nothing_here", base_url=url, cache_dir=cache) == p
    # a failed download names the URL and leaves nothing behind
    with pytest.raises(SourceError, match="news_rt.jsonl.gz"):
        locate("news_rt", root=tmp_path / "nothing_here", base_url=url, cache_dir=cache)
    assert not (cache / SOURCES["news_rt"].relpath).exists()
    assert not list((cache / "corpus" / "news_rt").glob("*"))
