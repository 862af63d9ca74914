"""pipeline.eval_parts: an evaluation run in parts merges into exactly what one run of all models gives,
and parts that do not share their reference or documents are refused with the file named."""
import json

import numpy as np
import pandas as pd
import pytest

from gmlib import eval_docs
from gmlib import evaluate as ev
from pipeline import eval_parts, records
from test_evaluate import TEXTS, CharTokenizer, UnigramLM, write_jsonl

NUMBERS = ["bpb", "bpb_lo", "bpb_hi", "bpb_delta", "bpb_delta_lo", "bpb_delta_hi", "ppl_token", "ppl_word", "n_bytes"]


@pytest.fixture
def setup(tmp_path):
    tok = CharTokenizer(TEXTS)
    docs = eval_docs.docs_from_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS * 3]), tok)
    rng = np.random.default_rng(0)
    models = {n: UnigramLM(np.log(rng.dirichlet(np.ones(tok.vocab_size())))) for n in ["ref", "b", "c", "d"]}
    return models, docs


def table(models, names, docs):
    return ev.quality_table({n: models[n] for n in names}, docs, n_boot=200, seed=0)


def csv_round_trip(df, path):
    df.to_csv(path, index=False)
    return pd.read_csv(path)


def test_two_parts_merge_into_the_one_run_table(setup, tmp_path):
    models, docs = setup
    whole = table(models, ["ref", "b", "c", "d"], docs).set_index("model")
    first = csv_round_trip(table(models, ["ref", "b", "c"], docs), tmp_path / "q.csv")
    merged = eval_parts.merge_quality(first, table(models, ["ref", "d", "c"], docs), tmp_path / "q.csv")
    assert list(merged["model"]) == ["ref", "b", "d", "c"]      # the reference first; c replaced, not doubled
    np.testing.assert_allclose(merged.set_index("model").loc[whole.index, NUMBERS], whole[NUMBERS], rtol=1e-12)
    assert records.metrics_record(merged, {})["models"]["d"]["bpb_delta"]["vs"] == "ref"


def test_parts_with_another_reference_or_other_documents_are_refused(setup, tmp_path):
    models, docs = setup
    first = table(models, ["ref", "b"], docs)
    with pytest.raises(ValueError, match="q.csv.*reference is ref"):
        eval_parts.merge_quality(first, table(models, ["c", "d"], docs), tmp_path / "q.csv")
    with pytest.raises(ValueError, match="q.csv.*same first dense model and documents"):
        eval_parts.merge_quality(first, table(models, ["ref", "d"], docs[:-1]), tmp_path / "q.csv")


def test_rows_and_texts_merge_with_the_new_part_winning():
    old = pd.DataFrame({"model": ["a", "a", "b"], "style": ["x", "y", "x"], "acc": [0.1, 0.2, 0.3]})
    new = pd.DataFrame({"model": ["b", "c"], "style": ["x", "x"], "acc": [0.9, 0.5]})
    got = eval_parts.merge_rows(old, new)
    assert got.to_dict("list") == {"model": ["a", "a", "b", "c"], "style": ["x", "y", "x", "x"],
                                   "acc": [0.1, 0.2, 0.9, 0.5]}
    texts = eval_parts.merge_texts({"p": {"a": "old", "b": "old"}}, {"p": {"b": "new"}, "q": {"b": "new"}})
    assert texts == {"p": {"a": "old", "b": "new"}, "q": {"b": "new"}}


def test_load_earlier(tmp_path):
    assert eval_parts.load_earlier(tmp_path, "connector") is None          # no part has run: nothing to merge
    pd.DataFrame({"model": ["ref"]}).to_csv(tmp_path / "eval_quality.csv", index=False)
    with pytest.raises(FileNotFoundError, match="summary.json"):
        eval_parts.load_earlier(tmp_path, "connector")
    for name in ["eval_parus.csv", "eval_parus_items.csv", "eval_docs.csv"]:
        pd.DataFrame({"model": ["ref"], "style": ["connector"]}).to_csv(tmp_path / name, index=False)
    (tmp_path / "eval_generations.json").write_text(json.dumps({"texts": {"p": {"ref": "т"}}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"parus": {"ref": {"connector": {"acc": 0.5}}}}))
    summary = {"parus_style": "connector", "models": {"ref": {"router": None}, "gm-k1": {"router": "local"}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    got = eval_parts.load_earlier(tmp_path, "connector")
    assert got["routers"] == {"gm-k1": "local"} and got["texts"] == {"p": {"ref": "т"}}
    with pytest.raises(ValueError, match="summary.json.*'connector'.*'mera'"):
        eval_parts.load_earlier(tmp_path, "mera")
