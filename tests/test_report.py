"""pipeline.report: the verdict follows the paired interval, tables keep every model, the full report
strings the frontier's headline, the findings and the experiment's tables in order."""
import pandas as pd
import pytest

from pipeline import report


def quality(deltas):
    """An eval_quality-like table: the reference first, then one gm mixture per (lo, hi) interval."""
    rows = [dict(model="dense", bpb=1.0, bpb_lo=0.9, bpb_hi=1.1, ppl_word=100.0, ppl_word_lo=90.0, ppl_word_hi=110.0,
                 bpb_delta=0.0, bpb_delta_lo=0.0, bpb_delta_hi=0.0, params_total=100e6, params_active=100e6,
                 train_gpu_seconds=300.0, bpb_macro=1.2, bpb_macro_lo=1.0, bpb_macro_hi=1.4, bpb_macro_delta=0.0,
                 bpb_macro_delta_lo=0.0, bpb_macro_delta_hi=0.0)]
    for i, (lo, hi) in enumerate(deltas):
        rows.append({**rows[0], "model": f"gm{i}-k1", "bpb": 1.0 + (lo + hi) / 2, "bpb_delta": (lo + hi) / 2,
                     "bpb_delta_lo": lo, "bpb_delta_hi": hi, "params_total": 800e6, "bpb_macro_delta": lo})
    return pd.DataFrame(rows)


def summary(q):
    return {"models": {m: {"router": "local" if m.startswith("gm") else None} for m in q["model"]}}


def test_verdict_reads_the_paired_interval():
    q = quality([(-0.2, -0.1), (0.1, 0.2), (-0.1, 0.1)])
    lines = report.verdict(q, summary(q))
    assert [line.split(" is ")[1].split(" dense")[0] for line in lines] == [
        "better than", "worse than", "not distinguishable from"]
    assert "800M stored, 100M active" in lines[0] and "-0.1500" in lines[0]
    assert "Against" not in lines[0]  # no other dense model to compare with


def test_verdict_compares_other_dense_models_by_their_intervals():
    q = quality([(0.2, 0.3), (-0.1, 0.1), (-0.4, -0.3)])
    q[["bpb_lo", "bpb_hi"]] = [[0.9, 1.1], [1.15, 1.35], [0.8, 1.0], [0.6, 0.7]]  # reference, gm0, gm1, gm2
    big = {**q.iloc[0].to_dict(), "model": "dense_big", "bpb": 0.8, "bpb_lo": 0.75, "bpb_hi": 0.85,
           "params_total": 300e6}
    q = pd.concat([q.iloc[:1], pd.DataFrame([big]), q.iloc[1:]], ignore_index=True)
    lines = report.verdict(q, summary(q))
    assert len(lines) == 3 and all("Against dense_big (300M, 300 device-s)" in line for line in lines)
    assert [line.split("device-s): ")[-1].split(", bpb")[0] for line in lines] == [
        "worse, the 95% intervals apart", "the 95% intervals overlap", "better, the 95% intervals apart"]
    assert "against 0.8000 [0.7500, 0.8500]" in lines[0]


def test_heldout_table_keeps_every_model_and_marks_kinds():
    q = quality([(-0.2, -0.1)])
    q.loc[len(q)] = {**q.iloc[1].to_dict(), "model": "gm0-expert3", "params_total": 100e6}
    t = report.heldout_table(q, {"models": {**summary(q)["models"], "gm0-expert3": {"router": "local"}}})
    assert list(t["model"]) == list(q["model"])
    assert list(t["kind"]) == ["dense", "gm mixture", "gm expert alone"]
    assert t.iloc[0]["bpb - dense [95% CI]"] == "" and t.iloc[1]["bpb - dense [95% CI]"] == "-0.1500 [-0.2000, -0.1000]"
    assert t.iloc[0]["bpb_macro [95% CI]"] == "1.2000 [1.0000, 1.4000]"


def test_heldout_table_of_records_from_before_the_macro_bpb():
    q = quality([(-0.2, -0.1)]).drop(columns=[c for c in quality([]).columns if c.startswith("bpb_macro")])
    t = report.heldout_table(q, summary(q))
    assert not any("macro" in c for c in t.columns) and t.iloc[1]["bpb [95% CI]"] == "0.8500 [0.9000, 1.1000]"


def test_parus_table_pivots_in_model_order():
    p = pd.DataFrame({"model": ["b", "b", "a", "a"], "style": ["connector", "mera"] * 2, "acc": [0.5, 0.6, 0.7, 0.8],
                      "ci_lo": [0.4] * 4, "ci_hi": [0.9] * 4})
    t = report.parus_table(p)
    assert list(t["model"]) == ["b", "a"] and t.loc[1, "mera"] == "0.80 [0.40, 0.90]"


def test_replace_block(tmp_path):
    f = tmp_path / "README.md"
    f.write_text(f"head\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    report.replace_block(f, "new $1 \\1 table\n")  # no regex escapes are interpreted
    assert f.read_text() == f"head\n{report.BEGIN}\nnew $1 \\1 table\n{report.END}\ntail\n"
    f.write_text("no markers\n")
    with pytest.raises(ValueError, match="README.md"):
        report.replace_block(f, "x")


def _ledger_rows():
    """Two budgets of a tiny ledger: at b1 the dense 10m is best and gm k8 is the best mixture."""
    base = {"budget_flops_6nd": 1e15, "delta_ci_lo": 0.0, "delta_ci_hi": 0.0, "delta_macro_ci_lo": 0.0,
            "delta_macro_ci_hi": 0.0, "params_active": 3e7}
    rows = [dict(base, budget="b1", model="dense10m", kind="dense", bpb_macro=1.00, delta_macro_vs_best_dense=0.0,
                 delta_vs_best_dense=0.0),
            dict(base, budget="b1", model="dense30m", kind="dense", bpb_macro=1.10, delta_macro_vs_best_dense=0.1,
                 delta_vs_best_dense=0.1),
            dict(base, budget="b1", model="gm-k1", kind="gm", bpb_macro=1.20, delta_macro_vs_best_dense=0.2,
                 delta_vs_best_dense=0.2),
            dict(base, budget="b1", model="gm-k8", kind="gm", bpb_macro=1.05, delta_macro_vs_best_dense=0.05,
                 delta_vs_best_dense=0.04, delta_macro_ci_lo=0.03, delta_macro_ci_hi=0.07, params_active=2.4e8),
            dict(base, budget="b2", model="dense30m", kind="dense", bpb_macro=0.90, budget_flops_6nd=4e15,
                 delta_macro_vs_best_dense=0.0, delta_vs_best_dense=0.0)]  # b2 has no gm: not in the table
    return pd.DataFrame(rows)


def test_frontier_table_pairs_the_best_dense_with_the_best_gm():
    t = report.frontier_table(_ledger_rows())
    assert list(t["budget"]) == ["b1"]
    r = t.iloc[0]
    assert (r["best dense"], r["best gm"], r["gm macro bpb"]) == ("dense10m", "gm-k8", "1.0500")
    assert r["gm - dense, macro [95% CI]"].startswith("+0.0500 [+0.0300, +0.0700] (+5.00%)")
    assert r["gm active params"] == "240M"
    with pytest.raises(ValueError, match="no budget"):
        report.frontier_table(_ledger_rows().query("kind == 'dense'"))


def test_full_report_strings_findings_between_the_frontier_and_the_experiment(tmp_path):
    (tmp_path / "results" / "frontier").mkdir(parents=True)
    (tmp_path / "results" / "frontier" / "FINDINGS.md").write_text("### What the runs show\n\n- gm loses\n")
    found = report.findings(["results/frontier/FINDINGS.md"], tmp_path)
    text = report.full_report("experiment", "#### Held-out quality\n", "| table |\n", "frontier/runs.csv", found)
    order = [text.index(x) for x in ("## The compute frontier (`results/frontier/runs.csv`)", "| table |",
                                     "frontier/frontier.png", "- gm loses", "from `results/frontier/FINDINGS.md`",
                                     "### Written by 07 from `results/experiment/`", "#### Held-out quality")]
    assert order == sorted(order)
    assert "## The compute frontier" not in report.full_report("experiment", "x", None, None, found)
    with pytest.raises(FileNotFoundError, match="missing.md"):
        report.findings(["results/missing.md"], tmp_path)


def test_cost_table_reads_every_stage(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(
        '{"stages": {"03_train_dense.a": {"device": "NVIDIA H100", "seconds": 330}, '
        '"05_evaluate": {"device": "cpu (x)", "seconds": 6}}}')
    t = report.cost_table([tmp_path / "run" / "metrics.json"])
    assert list(t["stage"]) == ["03_train_dense.a", "05_evaluate"] and list(t["minutes"]) == [5.5, 0.1]


def test_generations_show_the_chosen_models_per_prompt():
    rec = {"params": {"seed": 0}, "prompts": {"p": "Мама мыла"},
           "texts": {"p": {"dense": " раму\nи окно", "gm-k1": " пол", "gm-expert0": " стол"}}}
    md = report.generations(rec, ["dense", "gm-k1"])
    assert "**p.** Context: Мама мыла" in md and "- **dense:** …раму и окно" in md and "- **gm-k1:** …пол" in md
    assert "gm-expert0" not in md and "Sampling: seed=0." in md


def test_speed_table_keeps_one_row_per_variant_and_device():
    rec = dict(params=110e6, batch=64, peak_mem_gb=30.0, date="2026-11-28T12:00:00", status="ok")
    records = [{**rec, "variant": "b", "device": "H200", "tokens_per_s": 3.0, "mfu": 0.3},
               {**rec, "variant": "a", "device": "H200", "tokens_per_s": 2.0, "mfu": 0.2},
               {**rec, "variant": "a", "device": "H100", "tokens_per_s": 1.0, "mfu": 0.1},
               {**rec, "variant": "a", "device": "cpu", "tokens_per_s": 9.0, "mfu": None},
               {**rec, "variant": "c", "device": "H100", "status": "timeout after 130 s"}]
    t = report.speed_table(records, ["a", "b", "c"])
    assert list(zip(t.variant, t.device, t.tokens_per_s)) == [("a", "H100", 1), ("a", "H200", 2), ("b", "H200", 3)]
