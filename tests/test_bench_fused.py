"""bench/fused_experts.py on the CPU with its tiny option: the record has the issue's fields with sane
values, and its loss agreement between fused and one-by-one training is fp32 rounding (no timing asserted)."""
import json

import pytest

from helpers import load_script


def test_tiny_fused_benchmark_record(tmp_path, one_thread):
    bench = load_script("bench/fused_experts.py")
    out = tmp_path / "fused_experts.json"
    recs = bench.main(["--tiny", "--seconds", "0.2", "--out", str(out)])
    assert json.loads(out.read_text()) == recs and [r["group_size"] for r in recs] == [3, 2]
    for r in recs:
        assert r["status"] == "ok" and r["experts"] == 3 and r["expert_params"] > 0 and r["device"] and r["commit"]
        assert r["tokens_per_s_fused"] > 0 and r["tokens_per_s_sequential"] > 0
        assert r["speedup"] == pytest.approx(r["tokens_per_s_fused"] / r["tokens_per_s_sequential"], rel=1e-2)
        assert r["mfu"] is None  # no peak to compare with on a CPU
    a = recs[0]["agreement"]
    assert a["agree"] and a["max_diff"] < 1e-4 and len(a["per_expert"]) == 3
    for p in a["per_expert"]:
        assert p["first_step_over_0.1"] is None and p["loss_last"] < p["loss_first"]  # they learn
    assert len({p["lr"] for p in a["per_expert"]}) == 3  # each its own learning rate
    # a rerun replaces its records rather than adding to them
    bench.main(["--tiny", "--seconds", "0.1", "--out", str(out), "--group", "2", "--agree-steps", "3"])
    again = json.loads(out.read_text())
    assert len(again) == 2 and again[0] == recs[0] and again[1]["date"] >= recs[1]["date"]
