"""bench/train_quality.py: variants train on the same real shards, from the same initial weights and
on the same batches, and their validation curves are recorded; without the shards it says which
folder is missing."""
import json
import math

import pytest

from helpers import load_script


def test_two_variants_on_real_shards(tiny_shards, tmp_path, one_thread):
    tq = load_script("bench/train_quality.py")
    out = tmp_path / "quality.json"
    tq.main(["tiny-cpu", "tiny-cpu-bf16res-fp8row", "tiny-cpu-swiglu", "--shards", str(tiny_shards), "--steps", "12",
             "--eval-every", "6", "--eval-batches", "2", "--out", str(out)])
    recs = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(recs) == {"tiny-cpu", "tiny-cpu-bf16res-fp8row", "tiny-cpu-swiglu"}
    g = recs["tiny-cpu-swiglu"]  # the gated MLP compares on the same footing
    assert g["settings"]["activation"] == "swiglu" and g["mlp_width"] == 192 and \
        g["val_curve"][-1][1] < g["val_curve"][0][1]
    a, b = recs["tiny-cpu"], recs["tiny-cpu-bf16res-fp8row"]
    assert [s for s, _ in a["val_curve"]] == [6, 12] and a["tokens"] == 12 * 8 * 128
    assert a["val_curve"][-1][1] < a["val_curve"][0][1] and math.isfinite(b["val_loss"])
    # same weights and batches: the first step's loss differs by FP8's rounding only
    assert a["train_curve"][0][1] == pytest.approx(b["train_curve"][0][1], rel=0.01)
    with pytest.raises(SystemExit, match="no such shard folder"):
        tq.main(["tiny-cpu", "--shards", str(tmp_path / "nowhere"), "--out", str(out)])


def test_a_run_of_another_length_stays_beside_the_first(tmp_path):
    tq = load_script("bench/train_quality.py")
    out = tmp_path / "quality.json"
    rec = dict(config="124m", variant="v", device="gpu", steps=600, val_loss=4.49)
    tq.merge(out, rec, tq.QUALITY_KEY)
    tq.merge(out, dict(rec, steps=300, val_loss=5.15), tq.QUALITY_KEY)
    tq.merge(out, dict(rec, steps=300, val_loss=5.14), tq.QUALITY_KEY)  # a repeat replaces its own length only
    assert sorted((r["steps"], r["val_loss"]) for r in json.loads(out.read_text())) == [(300, 5.14), (600, 4.49)]
