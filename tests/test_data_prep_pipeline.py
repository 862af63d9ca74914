"""Stage 01 and the shard stage end to end on a tiny corpus made of real documents plus
planted bad input and duplicates: counts, resumability, worker-count independence."""
import gzip
import json
import os

import pytest

from data_prep import audit, prepare, shards, tokenizer
from data_prep.sources import SOURCES, SourceError
from gmlib.data import TokenShards

USED = ["books_ruslit", "news_rt", "social_ruarg_comments", "wiki_leipzig"]


@pytest.fixture(scope="module")
def corpus(real_docs, tmp_path_factory):
    """A data root with four sources; news_rt gets a bad JSON line and a record without text,
    social_ruarg_comments an exact and a near duplicate (one word changed) of news_rt documents;
    wiki_leipzig is truncated."""
    root = tmp_path_factory.mktemp("data")
    by = {s: [d["text"] for d in real_docs if d["source"] == s] for s in USED}
    near = by["news_rt"][1].split(" ")
    near[len(near) // 2] = "ИЗМЕНЕНО"
    by["social_ruarg_comments"] += [by["news_rt"][0], " ".join(near)]
    for s, texts in by.items():
        p = root / SOURCES[s].relpath
        p.parent.mkdir(parents=True)
        lines = [json.dumps({"id": f"{s}-{i}", "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
        if s == "news_rt":
            lines[1:1] = ["{broken json", json.dumps({"id": "no-text"})]
        with gzip.open(p, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    wl = root / SOURCES["wiki_leipzig"].relpath
    wl.write_bytes(wl.read_bytes()[:-40])  # cut the gzip trailer and some data
    return root, by


def _cfg(root, **kw):
    kw = {"data_name": "t", "sources": list(USED), "max_bytes_per_source": None, "val_frac": 0.2, "test_frac": 0.2,
          "workers": 1, "data_root": str(root), **kw}
    return prepare.DataConfig(**kw)


def test_counts_bad_input_and_duplicates(corpus, tmp_path):
    root, by = corpus
    res = prepare.prepare(_cfg(root), tmp_path / "clean", log=lambda *a: None)
    A = audit.build(res, "t")
    news = A["sources"]["news_rt"]
    assert news["read_issues"]["bad_json"] == 1 and news["read_issues"]["no_text"] == 1
    assert news["docs_in"] == len(by["news_rt"])
    ruarg = A["sources"]["social_ruarg_comments"]["removed_docs"]
    assert ruarg["exact_dup"] == 1 and ruarg["near_dup"] == 1
    assert A["sources"]["wiki_leipzig"]["read_issues"]["truncated"] == 1
    assert 0 < A["sources"]["wiki_leipzig"]["docs_in"] < len(by["wiki_leipzig"])
    for s, v in A["sources"].items():  # every document in is either out or removed by one rule
        assert v["docs_in"] == v["docs_out"] + sum(v["removed_docs"].values()), s
    out = {sp: list(prepare.iter_split(tmp_path / "clean", sp)) for sp in ("train", "val", "test")}
    assert sum(map(len, out.values())) == A["totals"]["docs_out"] and all(out.values())
    assert A["rules"]["exact_dup"]["docs"] == 1 and A["throughput_mb_s_per_core"]["cleaning"] > 0
    t = audit.source_table(A)
    assert t.iloc[-1]["source"] == "TOTAL" and t.iloc[-1]["docs_in"] == A["totals"]["docs_in"]
    audit.plot(A)


def test_missing_source_error_or_counted_skip(corpus, tmp_path):
    root, _ = corpus
    cfg = _cfg(root)
    cfg.sources = USED + ["blogs_habr"]
    with pytest.raises(SourceError, match="blogs_habr"):
        prepare.prepare(cfg, tmp_path / "c1", log=lambda *a: None)
    cfg = _cfg(root, on_missing="skip")
    cfg.sources = USED + ["blogs_habr"]
    A = audit.build(prepare.prepare(cfg, tmp_path / "c2", log=lambda *a: None), "t")
    assert A["sources"]["blogs_habr"]["missing"] == 1 and A["sources"]["blogs_habr"]["docs_in"] == 0


def _snapshot(d):
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


def test_rerun_reuses_and_changes_redo(corpus, tmp_path):
    root, _ = corpus
    d = tmp_path / "clean"
    prepare.prepare(_cfg(root), d, log=lambda *a: None)
    before = _snapshot(d)
    prepare.prepare(_cfg(root), d, log=lambda *a: None)
    assert _snapshot(d) == before                      # nothing rewritten
    # a killed run: a source's output exists but its marker does not -> only that source is redone
    (d / "filtered" / "news_rt.json").unlink()
    prepare.prepare(_cfg(root), d, log=lambda *a: None)
    after = _snapshot(d)
    assert after["filtered/wiki_leipzig.jsonl"] == before["filtered/wiki_leipzig.jsonl"]
    assert after["filtered/news_rt.jsonl"][1] == before["filtered/news_rt.jsonl"][1]
    # another threshold: the filter stage runs again and its marker records the new hash
    cfg = _cfg(root)
    cfg.clean.min_words = 30
    res = prepare.prepare(cfg, d, log=lambda *a: None)
    assert res["filtered"]["news_rt"]["params_hash"] != json.loads(before["filtered/news_rt.json"][1])["params_hash"]


def test_output_does_not_depend_on_worker_count(corpus, tmp_path):
    root, _ = corpus
    prepare.prepare(_cfg(root), tmp_path / "w1", log=lambda *a: None)
    cfg = _cfg(root, workers=2, batch_bytes=2000)
    prepare.prepare(cfg, tmp_path / "w2", log=lambda *a: None)
    for sp in ("train", "val", "test"):
        for s in USED:
            assert ((tmp_path / "w1" / sp / f"{s}.jsonl").read_bytes()
                    == (tmp_path / "w2" / sp / f"{s}.jsonl").read_bytes())


def test_weights_repeat_and_thin_training_documents(corpus, tmp_path):
    root, _ = corpus
    base = prepare.prepare(_cfg(root), tmp_path / "a", log=lambda *a: None)["split"]["counts"]
    w = prepare.prepare(_cfg(root, weights={"wiki_leipzig": 3.0, "news_rt": 0.0}), tmp_path / "b",
                        log=lambda *a: None)["split"]["counts"]
    assert w["train"]["wiki_leipzig"]["docs"] == 3 * base["train"]["wiki_leipzig"]["docs"]
    assert w["train"]["news_rt"]["docs"] == 0
    assert w["val"] == base["val"] and w["test"] == base["test"]  # weights never touch val/test


def test_tokenizer_and_shards(corpus, tmp_path):
    root, _ = corpus
    d = tmp_path / "clean"
    prepare.prepare(_cfg(root), d, log=lambda *a: None)
    model = tmp_path / "tokenizer.model"
    meta = tokenizer.train_on_split(d, model, tokenizer.TokenizerConfig(vocab_size=400, num_threads=1))
    assert meta["sample_docs"] > 0 and model.is_file()
    mtime = model.stat().st_mtime_ns
    tokenizer.train_on_split(d, model, tokenizer.TokenizerConfig(vocab_size=400, num_threads=1))
    assert model.stat().st_mtime_ns == mtime           # reused
    sh = shards.tokenize_all(d, model, tmp_path / "shards", shards.ShardConfig(workers=1), log=lambda *a: None)
    sp = tokenizer.load(model)
    for split in ("train", "val", "test"):
        docs = list(prepare.iter_split(d, split))
        ts = TokenShards(tmp_path / "shards" / split)
        assert ts.n_docs == len(docs) == sh[split]["n_docs"]
        assert ts.n_tokens == sh[split]["n_tokens"] == \
            len(docs) + sum(v["tokens"] for v in sh[split]["per_source"].values())
        for i in (0, len(docs) - 1):
            assert sp.decode(ts.doc(i)[1:].tolist()) == docs[i]["text"]
            assert ts.sources[ts.doc_source[i]] == docs[i]["source"]
            assert ts.doc_nbytes[i] == len(docs[i]["text"].encode("utf-8"))
    marker = tmp_path / "shards" / "val.done.json"
    m0 = marker.stat().st_mtime_ns
    sh2 = shards.tokenize_all(d, model, tmp_path / "shards", shards.ShardConfig(workers=2), log=lambda *a: None)
    assert marker.stat().st_mtime_ns == m0 and sh2["val"]["n_tokens"] == sh["val"]["n_tokens"]
    # a split folder without its meta.json (killed writer) is rewritten
    os.unlink(tmp_path / "shards" / "val" / "meta.json")
    sh3 = shards.tokenize_all(d, model, tmp_path / "shards", shards.ShardConfig(workers=2), log=lambda *a: None)
    assert TokenShards(tmp_path / "shards" / "val").n_tokens == sh3["val"]["n_tokens"] == sh["val"]["n_tokens"]


def test_clean_record_is_the_filter_stages_rule():
    # 05_evaluate cleans an outside corpus with it: clean_text, then doc_filter with the source's role
    from data_prep import clean
    good = "Это обычный русский текст о погоде. " * 20
    for rec in ({"text": good, "source": "news_rt"}, {"text": good}, {"text": "too short"},
                {"text": "<p>" + good + "</p>"}):
        role = SOURCES[rec["source"]].role if rec.get("source") in SOURCES else "web"
        text, _ = clean.clean_text(rec["text"])
        assert prepare.clean_record(rec) == (text if clean.doc_filter(text, role) is None else None)
    assert prepare.clean_record({"text": "too short"}) is None
    assert prepare.cleaned_text("<p>" + good + "</p>") == clean.clean_text("<p>" + good + "</p>")[0]
