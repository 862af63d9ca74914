"""The hand-made regression corpus (tests/data/regression_corpus.yaml, invented texts): each kind of
junk the cleaning must remove and each kind of good short text it must keep, run through the
whole of stage 01 with the committed per-source rules of params/data/01_data.yaml."""
import gzip
import json
from pathlib import Path

import pytest
import yaml

from data_prep import audit, prepare
from data_prep.sources import SOURCES

HERE = Path(__file__).resolve().parent
PARAMS = yaml.safe_load((HERE.parent / "params" / "data" / "01_data.yaml").read_text())


def _docs():
    docs = yaml.safe_load((HERE / "data" / "regression_corpus.yaml").read_text())
    for d in docs:
        d["text"] = d.get("prefix", "") + d["text"] * d.get("repeat", 1)
    return docs


DOCS = _docs()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stage 01 over the corpus, one source file per source named in it."""
    root = tmp_path_factory.mktemp("regression")
    used = sorted({d["source"] for d in DOCS})
    for s in used:
        p = root / SOURCES[s].relpath
        p.parent.mkdir(parents=True)
        with gzip.open(p, "wt", encoding="utf-8") as f:
            for d in DOCS:
                if d["source"] == s:
                    f.write(json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False) + "\n")
    cfg = prepare.DataConfig(data_name="reg", sources=used, max_bytes_per_source=None, val_frac=0.0, test_frac=0.0,
                             workers=1, data_root=str(root),
                             source_rules={s: r for s, r in PARAMS["source_rules"].items() if s in used})
    clean_dir = tmp_path_factory.mktemp("clean")
    res = prepare.prepare(cfg, clean_dir, log=lambda *a: None)
    kept = {}
    for s in used:
        for line in open(clean_dir / "filtered" / f"{s}.jsonl", encoding="utf-8"):
            rec = json.loads(line)
            kept[rec["id"]] = rec["text"]
    return res, kept


def test_corpus_is_varied():
    assert len(DOCS) >= 25 and len({d["id"] for d in DOCS}) == len(DOCS)
    assert {d["expect"] for d in DOCS} >= {"keep", "not_russian", "repetition"}


@pytest.mark.parametrize("doc", DOCS, ids=[d["id"] for d in DOCS])
def test_expected_outcome(run, doc):
    res, kept = run
    if doc["expect"] == "keep":
        assert doc["id"] in kept, f"{doc['kind']}: removed"
        text = kept[doc["id"]]
        for s in doc.get("absent", []):
            assert s not in text, f"{doc['kind']}: {s!r} survived in {text!r}"
        for s in doc.get("present", []):
            assert s in text, f"{doc['kind']}: {s!r} missing from {text!r}"
    else:
        assert doc["id"] not in kept
        f = res["filtered"][doc["source"]]
        assert f["removed"][doc["expect"]] >= 1, f"{doc['kind']}: not removed by {doc['expect']} ({f['removed']})"


def test_no_residual_junk_in_kept_text(run):
    res, _ = run
    A = audit.build(res, "reg")
    for s, v in A["sources"].items():
        assert all(x == 0 for x in v["residual"].values()), (s, v["residual"], v["residual_examples"])


def test_new_source_and_switches_from_params_alone(tmp_path):
    """A source unknown to the registry, described only by params (role, relpath), runs through
    stage 01 with its own rule switches; bad switches are errors that name the source."""
    p = tmp_path / "corpus" / "social_my_forum.jsonl.gz"
    p.parent.mkdir(parents=True)
    texts = ["- Ты где?\n- Дома\n- А я нет", "Сегодня снова шёл снег, и мы весь вечер сидели дома."]
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    spec = {"social_my_forum": {"role": "social", "relpath": "corpus/social_my_forum.jsonl.gz", "license": "test"}}
    base = dict(data_name="new", sources=["social_my_forum"], max_bytes_per_source=None, val_frac=0.0, test_frac=0.0,
                workers=1, data_root=str(tmp_path), extra_sources=spec)
    strict = prepare.prepare(prepare.DataConfig(**base), tmp_path / "a", log=lambda *a: None)
    assert strict["filtered"]["social_my_forum"]["role"] == "social"
    assert strict["filtered"]["social_my_forum"]["docs_kept"] == 1  # the dialogue fails newline_ratio
    rules = {"social_my_forum": {"skip_rules": ["newline_ratio", "line_punct"], "min_words": 3}}
    loose = prepare.prepare(prepare.DataConfig(**base, source_rules=rules), tmp_path / "b", log=lambda *a: None)
    assert loose["filtered"]["social_my_forum"]["docs_kept"] == 2
    with pytest.raises(ValueError, match="source_rules.social_my_forum.*min_wrods"):
        prepare.DataConfig(**base, source_rules={"social_my_forum": {"min_wrods": 3}}).validate()
    with pytest.raises(ValueError, match="unknown rule"):
        prepare.DataConfig(**base, source_rules={"social_my_forum": {"skip_rules": ["no_such_rule"]}}).validate()
    with pytest.raises(ValueError, match="extra_sources.bad"):
        prepare.DataConfig(**{**base, "extra_sources": {"bad": {"role": "tv"}}}).validate()
