"""The frontier ledger: paired differences against hand computations, and row replacement."""
import json

import numpy as np
import pandas as pd
import pytest

from gmlib import frontier


def _docs():
    # two sources of unequal size; dense "b" is better than dense "a" on source x only, gm "g" is "a" plus 10 bits a doc
    rows = []
    for doc, (src, nb, a, b) in enumerate([("x", 100, 300.0, 200.0), ("x", 50, 100.0, 80.0),
                                           ("y", 400, 800.0, 800.0), ("y", 200, 500.0, 500.0), ("y", 10, 9.0, 9.0)]):
        for m, bits in (("a", a), ("b", b), ("g", a + 10)):
            rows.append({"model": m, "doc": doc, "source": src, "n_bytes": nb, "n_tokens": nb // 4, "n_words": nb // 6,
                         "bits": bits, "max_doc_tokens": None})
    return pd.DataFrame(rows)


FACTS = {"a": {"kind": "dense", "flops_6nd": 1e15, "model_size": "30m"}, "b": {"kind": "dense", "flops_6nd": 1e15},
         "g": {"kind": "gm", "flops_6nd": 1e15, "k": 2, "pool": "linear", "family": "local seed=0.75 r=1"}}
INFO = {m: {"params_total": 8 if m == "g" else 1, "params_active": 2 if m == "g" else 1, "train_gpu_seconds": 3.0}
        for m in "abg"}


def test_rows_pair_every_model_with_the_best_dense_one():
    df = frontier.rows(_docs(), INFO, FACTS, "B1", None, {"device": "cpu", "commit": "x", "date": "d"}, n_boot=200)
    r = df.set_index("model")
    macro_b = ((200 + 80) / 150 + (800 + 500 + 9) / 610) / 2
    assert r.loc["b", "bpb_macro"] == pytest.approx(macro_b) and set(df["best_dense"]) == {"b"}
    assert r.loc["b", "delta_macro_vs_best_dense"] == 0.0 and r.loc["b", "delta_vs_best_dense"] == 0.0
    # g - b, by hand: per source, the difference of bits over the source's bytes, then the mean of the sources
    macro_gb = ((310 - 200 + 110 - 80) / 150 + 30 / 610) / 2
    micro_gb = (310 + 110 + 810 + 510 + 19 - 200 - 80 - 800 - 500 - 9) / 760
    assert r.loc["g", "delta_macro_vs_best_dense"] == pytest.approx(macro_gb)
    assert r.loc["g", "delta_vs_best_dense"] == pytest.approx(micro_gb)
    assert r.loc["g", "delta_macro_ci_lo"] <= macro_gb <= r.loc["g", "delta_macro_ci_hi"]
    assert r.loc["g", "budget_flops_6nd"] == 1e15 and r.loc["g", "k"] == 2 and r.loc["a", "model_size"] == "30m"
    assert list(df.columns) == frontier.COLUMNS


def test_size_names_a_preset_or_counts_parameters():
    from gmlib.model import PRESETS, make_config
    from dataclasses import asdict
    assert frontier._size(asdict(make_config("30m", vocab_size=1000, n_head=4))) == "30m"
    assert frontier._size(asdict(make_config("30m", vocab_size=1000, n_layer=3))).endswith("M")
    assert "30m" in PRESETS


def _row(budget, model, kind, bpb_macro, flops, family=""):
    r = {c: np.nan for c in frontier.COLUMNS}
    r.update(budget=budget, model=model, kind=kind, family=family, bpb_macro=bpb_macro,
             bpb_macro_ci_lo=bpb_macro - 0.01, bpb_macro_ci_hi=bpb_macro + 0.01, budget_flops_6nd=flops,
             flops_6nd=flops, delta_macro_vs_best_dense=0.0,
             delta_macro_ci_lo=-0.01, delta_macro_ci_hi=0.01, delta_vs_best_dense=0.0, delta_ci_lo=-0.01,
             delta_ci_hi=0.01, params_active=1)
    return r


def test_update_replaces_rows_of_the_same_budget_and_model(tmp_path):
    path = tmp_path / "runs.csv"
    frontier.update(path, pd.DataFrame([_row("B1", "dense", "dense", 1.0, 1e15),
                                        _row("B1", "gm", "gm", 1.1, 1e15, "r1")]))
    df = frontier.update(path, pd.DataFrame([_row("B1", "gm", "gm", 0.9, 1e15, "r1"),
                                             _row("B2", "dense", "dense", 0.8, 4e15)]))
    assert len(df) == 3 and df.set_index(KEY := ["budget", "model"]).loc[("B1", "gm"), "bpb_macro"] == 0.9
    assert frontier.read(path)[KEY].values.tolist() == [["B1", "dense"], ["B1", "gm"], ["B2", "dense"]]
    best = frontier.best_table(df)
    assert best[["budget", "best_dense", "best_gm"]].values.tolist() == [["B1", "dense", "gm"]]
    assert best["delta_macro_rel"].iloc[0] == 0.0
    assert frontier.best_dense(df)["model"].tolist() == ["dense", "dense"]
    frontier.figure(df)


def test_read_refuses_a_file_that_is_not_a_ledger(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a frontier ledger"):
        frontier.read(tmp_path / "x.csv")


def test_rows_refuse_a_model_trained_with_more_than_the_budget():
    facts = {**FACTS, "g": {**FACTS["g"], "flops_6nd": 8e15}}   # a gm with K times its twin's compute
    with pytest.raises(ValueError, match="g: trained 8e\\+15"):
        frontier.rows(_docs(), INFO, facts, "B1", None, {"device": "cpu", "commit": "x", "date": "d"}, n_boot=20)


def test_update_refuses_to_mix_scorings_within_a_budget(tmp_path):
    path = tmp_path / "runs.csv"
    a, b = _row("B1", "dense", "dense", 1.0, 1e15), _row("B1", "gm", "gm", 1.1, 1e15, "r1")
    a.update(n_docs=10, best_dense="dense")
    b.update(n_docs=12, best_dense="dense")  # scored on other documents
    frontier.update(path, pd.DataFrame([a]))
    with pytest.raises(ValueError, match="mix rows with different \\['n_docs'\\]"):
        frontier.update(path, pd.DataFrame([b]))


def _append_rows(path, budget, n):
    for i in range(n):
        frontier.update(path, pd.DataFrame([_row(budget, f"m{i}", "dense", 1.0 + i, 1e15)]))


def test_two_processes_updating_the_ledger_lose_no_row(tmp_path):
    # two plans on one machine evaluate side by side: each read-modify-write holds the ledger's lock
    import multiprocessing as mp
    path = tmp_path / "runs.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_rows, args=(path, b, 15)) for b in ("B1", "B2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    df = frontier.read(path)
    assert len(df) == 30 and set(df["budget"]) == {"B1", "B2"}


def _saved_evaluation(run_dir, docs, facts):
    """What notebook 05 saves before it appends to the ledger: eval_docs (gzipped, as results/ keeps
    it), eval_quality (its params and GPU-seconds columns) and eval_facts."""
    from gmlib import evaluate
    run_dir.mkdir(parents=True)
    docs.to_csv(run_dir / "eval_docs.csv.gz", index=False)
    evaluate.quality_from_docs(docs, INFO, 200, 0).to_csv(run_dir / "eval_quality.csv", index=False)
    (run_dir / "eval_facts.json").write_text(json.dumps(facts))
    (run_dir / "metrics.json").write_text(json.dumps({"stages": {
        "05_evaluate": {"device": "cpu", "git_commit": "abc", "finished_at": "2026-12-04T20:00:00+0000"}}}))


def _fractional_docs():
    return _docs().assign(bits=lambda d: d["bits"] * 1.0370370370370371)  # bits that a CSV round trip must keep


STAMP = {"device": "cpu", "commit": "abc", "date": "2026-12-04"}


def test_ledger_rows_from_saved_files_equal_the_evaluations_own(tmp_path):
    from pipeline.eval_parts import ledger_rows_from_files
    docs = _fractional_docs()
    _saved_evaluation(tmp_path / "b1", docs, FACTS)
    got = ledger_rows_from_files(tmp_path / "b1", "B1", None, STAMP, n_boot=200, seed=0)
    pd.testing.assert_frame_equal(got, frontier.rows(docs, INFO, FACTS, "B1", None, STAMP, n_boot=200, seed=0))
    (tmp_path / "b1" / "eval_facts.json").write_text(json.dumps({k: v for k, v in FACTS.items() if k != "g"}))
    with pytest.raises(ValueError, match=r"eval_facts\.json: no entry for \['g'\]"):
        ledger_rows_from_files(tmp_path / "b1", "B1", None, STAMP, n_boot=200, seed=0)
    (tmp_path / "b1" / "eval_quality.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"eval_quality\.csv: missing"):
        ledger_rows_from_files(tmp_path / "b1", "B1", None, STAMP, n_boot=200, seed=0)


def test_ledger_script_adds_the_missing_rows_only_when_the_others_recompute_equal(tmp_path, monkeypatch):
    import yaml
    from gmlib.paths import REPO_ROOT
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import ledger_from_eval
    monkeypatch.setenv("GM_RESULTS_DIR", str(tmp_path / "results"))
    docs = _fractional_docs()
    run = tmp_path / "results" / "fr" / "b1"
    _saved_evaluation(run, docs, FACTS)
    params = tmp_path / "05_evaluate.settings.params.yaml"
    params.write_text(yaml.safe_dump({"ledger": "fr", "budget": "B1", "budget_flops_6nd": None, "n_boot": 200,
                                      "seed": 0}))
    ledger = tmp_path / "results" / "fr" / "runs.csv"
    full = frontier.rows(docs, INFO, FACTS, "B1", None, STAMP, n_boot=200, seed=0)  # what 05 appends in one go
    want = tmp_path / "want.csv"
    frontier.update(want, full)
    by_model = lambda path: frontier.read(path).sort_values("model", ignore_index=True)  # noqa: E731

    frontier.update(ledger, full[full["model"] != "g"])   # the part that appended before the cut-off one
    ledger_from_eval.main([str(run), str(params)])
    pd.testing.assert_frame_equal(by_model(ledger), by_model(want))

    # the earlier part scored a and g only (best dense a); the cut-off part added b, the better dense model,
    # so every paired difference moves and all rows are rewritten, as 05 would have
    only_ag = docs[docs["model"] != "b"]
    early = frontier.rows(only_ag, INFO, {k: FACTS[k] for k in "ag"}, "B1", None, STAMP, n_boot=200, seed=0)
    assert set(early["best_dense"]) == {"a"}
    ledger.unlink()
    frontier.update(ledger, early)
    ledger_from_eval.main([str(run), str(params)])
    pd.testing.assert_frame_equal(by_model(ledger), by_model(want))

    bad = full[full["model"] != "g"].assign(bpb_macro=lambda d: d["bpb_macro"] + 0.01)
    ledger.unlink()
    frontier.update(ledger, bad)
    with pytest.raises(SystemExit, match=r"differ from the ledger's in \['bpb_macro'\]"):
        ledger_from_eval.main([str(run), str(params)])
    assert "g" not in set(frontier.read(ledger)["model"])
