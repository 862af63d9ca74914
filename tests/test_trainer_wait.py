"""Where the gm trainer's GPU waits for experts (gmlib.clock in gmlib.gm): every part is recorded,
non-negative and adds up within each segment; a run with every expert resident moves nothing to the
GPU tier and hardly waits to fetch; each finished expert's record is written once, at the end of its
phase. bench/offload.py and bench/scale.py in their tiny CPU modes write their records, which the
report reads. No timing is asserted beyond what holds on any machine."""
import json

import numpy as np
import pytest

from gmlib import atomic, gm
from pipeline import report
from gmlib.clock import PARTS, WAIT, Clock
from gmlib.data import ShardWriter
from gmlib.store import ExpertStore
from helpers import load_script

VOCAB, T = 256, 32
TRAIN = dict(batch_size=2, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=2, log_every=3)
CFG = dict(n_experts=4, router="random", model={"seq_len": T}, budget="fixed", tokens=3 * 3 * 2 * T,
           segment_steps=3, device="cpu", **TRAIN)  # 3 segments of 3 steps per expert

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Random tokens: train/ and val/ (the clock's numbers do not depend on what is learned)."""
    root, rng = tmp_path_factory.mktemp("random_shards"), np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 8)):
        with ShardWriter(root / split, vocab_size=VOCAB, sources=["random"]) as w:
            for _ in range(n):
                w.add(rng.integers(0, VOCAB, 4 * T), nbytes=4 * T)
    return root


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """The same gm with the trainer's default GPU tier (2 expert states) and with all 4 resident."""
    one = gm.state_bytes(gm.make_config("tiny", vocab_size=VOCAB, seq_len=T))
    out = {}
    for name, gpu_bytes in (("swap", None), ("resident", 4 * one)):
        d = tmp_path_factory.mktemp(f"gm_{name}")
        out[name] = d, gm.train_gm(gm.GMConfig.from_dict({**CFG, "gpu_bytes": gpu_bytes}), shards, d)
    return out


def test_every_part_is_recorded_and_adds_up(runs):
    for name, (_, s) in runs.items():
        sw, tw = s["swap"], s["ranks"][0]["trainer_wait"]
        assert sw["trainer_wait_s"] == pytest.approx(tw["trainer_wait_s"]) and 0 <= sw["trainer_wait_frac"] <= 1
        assert set(sw["trainer_parts"]) == {f"{p}_s" for p in (*PARTS, "other")}
        assert all(v >= 0 for v in sw["trainer_parts"].values()), sw["trainer_parts"]
        assert tw["trainer_wait_s"] == pytest.approx(sum(tw[f"{p}_s"] for p in WAIT))
        assert tw["train_s"] > 0 and tw["wall_s"] <= s["ranks"][0]["wall_s"]
        segs = tw["segments"]
        assert len(segs) == 4 * 3 and sum(s["step_end"] - s["step"] for s in segs) == 4 * 9
        assert [s["found"] for s in segs[:4]] == ["new"] * 4 and all(s["found"] != "new" for s in segs[4:])
        for seg in segs:
            parts = [seg[f"{p}_s"] for p in PARTS]
            assert min(parts) >= 0 and sum(parts) <= seg["wall_s"] + 1e-6, seg
            assert seg["wait_s"] == pytest.approx(sum(seg[f"{p}_s"] for p in WAIT))
        # the experts' own training seconds are what the clock calls train, less the clock's own syncs
        assert tw["train_s"] >= 0.5 * sum(r["accounting"]["gpu_seconds"] for r in s["records"]), name


def test_a_resident_run_fetches_nothing(runs):
    (_, sw), (_, rs) = runs["swap"], runs["resident"]
    st_sw, st_rs = sw["ranks"][0]["store"], rs["ranks"][0]["store"]
    assert st_rs["bytes_to_dev"] == 0 and st_rs["misses"]["dev"] == 0 and st_rs["evictions"]["dev"] == 0
    assert st_sw["bytes_to_dev"] > 0 and st_sw["evictions"]["dev"] > 0  # two slots for four experts: they moved
    tw = rs["ranks"][0]["trainer_wait"]
    assert tw["fetch_s"] < 0.25 * tw["train_s"]  # a hit in the GPU tier: views and a copy of its meta
    # what was trained does not depend on where the experts waited
    assert [r["val_loss"] for r in sw["records"]] == [r["val_loss"] for r in rs["records"]]


def test_records_are_written_once_at_the_end_of_the_phase(shards, tmp_path, monkeypatch):
    writes, flushes, real_write, real_flush = [], [], atomic.write_json, ExpertStore.flush

    def write_json(path, obj, *a, **kw):
        if path.parent.name == "experts":
            writes.append((path.stem, len(flushes)))
        return real_write(path, obj, *a, **kw)

    def flush(self):
        flushes.append(1)
        return real_flush(self)

    monkeypatch.setattr(gm.atomic, "write_json", write_json)
    monkeypatch.setattr(ExpertStore, "flush", flush)
    s = gm.train_gm(gm.GMConfig.from_dict(CFG), shards, tmp_path / "gm")
    assert sorted(n for n, _ in writes) == s["experts"]   # each once
    assert {f for _, f in writes} == {1}                     # all after the phase's one flush
    for e in s["experts"]:
        rec = json.loads((tmp_path / "gm" / "experts" / f"{e}.json").read_text())
        assert rec["done"] and rec["trainer"]["step"] == 9 and rec["val_loss"] is not None


def test_clock_parts_and_segments():
    ck = Clock("cpu")
    rec = ck.begin(expert="a")
    with ck.part("fetch"):
        pass
    with ck.part("train"):
        sum(range(10000))
    ck.move("train", "eval", 0.0)
    ck.end()
    with ck.part("sync"):
        pass
    out = ck.summary()
    assert out["segments"] == [rec] and rec["expert"] == "a" and rec["wall_s"] >= rec["train_s"] > 0
    assert out["wall_s"] == pytest.approx(rec["wall_s"] + out["sync_s"]) and 0 <= out["trainer_wait_frac"] <= 1
    with pytest.raises(ValueError, match="unknown part"):
        with ck.part("nap"):
            pass


def test_offload_bench_writes_the_trainer_record(tmp_path):
    off = load_script("bench/offload.py")
    out = tmp_path / "offload.json"
    r = off.main([str(out), "--preset", "tiny", "--seq-len", "32", "--batch", "2", "--experts", "4", "--rounds", "2",
                  "--segment-steps", "3", "--log-every", "3", "--compile", "0", "--vocab", "256",
                  "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["source"] == "gm_trainer" and r["experts"] == 4 and r["gpu_slots"] == 2
    assert 0 <= r["overhead_frac"] <= 1 and 0 <= r["overhead_frac_whole"] <= 1
    assert isinstance(r["overhead_vs_resident"], float) and isinstance(r["overhead_vs_resident_whole"], float)
    assert r["device"] and r["commit"] and r["config"]["segment_steps"] == 3
    sw, rs = r["runs"]["swap"], r["runs"]["resident"]
    assert sw["steady"]["segments"] == rs["steady"]["segments"] == 4 and sw["steady"]["steps"] == 4 * 3
    assert rs["store"]["bytes_to_dev"] == 0 < sw["store"]["bytes_to_dev"]
    assert not (tmp_path / "work" / "swap").exists()  # each run's gm is removed once read
    line = report.store_lines(r, None)[0]
    assert line.startswith("The gm trainer swapping 4 experts") and "every expert resident" in line
    with pytest.raises(SystemExit, match="slots"):
        off.main([str(out), "--experts", "2", "--slots", "2"])


def test_scale_bench_trains_through_the_trainer(tmp_path):
    sc = load_script("bench/scale.py")
    out = tmp_path / "scale.json"
    sc.main([str(out), "--preset", "tiny", "--target-params", "5e6", "--batch", "2", "--seq-len", "32", "--steps", "2",
             "--ram-gb", "0.001", "--fresh", "1", "--store", str(tmp_path / "store")])
    r = json.loads(out.read_text())
    assert r["source"] == "gmlib.train.Trainer" and r["complete"] and r["mismatched"] == [] and r["commit"]
    assert r["on_disk"] > 0 and r["experts"] == r["verified"] >= 2
    assert "Parameters trained on one GPU" in report.store_lines(None, r)[0]


def test_report_reads_an_offload_record_of_the_old_loop():
    old = {"experts": 8, "expert_params": 109529856, "gpu_slots": 3, "overhead_frac": 0.0087, "copy_gb_s": 54.9,
           "overhead_vs_baseline": 0.025, "device": "NVIDIA H100 80GB HBM3"}
    (line,) = report.store_lines(old, None)
    assert "0.87%" in line and "not the gm trainer's" in line



def test_report_splits_the_trainer_wait_into_swap_and_writeback():
    # the H200 record's numbers: the wait clock also counts the writeback and flush a resident run pays
    r = {"source": "gm_trainer", "experts": 8, "expert_params": 110119680, "gpu_slots": 2, "overhead_frac": 0.0509,
         "overhead_frac_whole": 0.068, "overhead_vs_resident": 0.0016, "wall_s": 52.72, "fetch_s": 0.0576,
         "load_s": 0.1203, "writeback_s": 1.518, "sync_s": 0.9887, "resident_wait_s": 2.768, "device": "NVIDIA H200"}
    (line,) = report.store_lines(r, None)
    assert "read 5.09%" in line and "fetch and load 0.34%" in line and "writeback and flush 4.75%" in line
    assert "resident run waited 2.77 s" in line and "+0.2% against" in line

def test_fused_groups_keep_the_clock(shards, tmp_path):
    # group_size 2 (gmlib.fused): one clock record per group, its steps summed over its members
    s = gm.train_gm(gm.GMConfig.from_dict({**CFG, "group_size": 2}), shards, tmp_path)
    tw = s["ranks"][0]["trainer_wait"]
    segs = tw["segments"]
    assert len(segs) == 2 * 3 and all("+" in seg["expert"] for seg in segs)
    assert sum(seg["step_end"] - seg["step"] for seg in segs) == 4 * 9
    assert [seg["found"] for seg in segs[:2]] == ["new"] * 2 and all(seg["found"] != "new" for seg in segs[2:])
    assert tw["trainer_wait_s"] == pytest.approx(sum(tw[f"{p}_s"] for p in WAIT)) and tw["train_s"] > 0
    for seg in segs:
        assert min(seg[f"{p}_s"] for p in PARTS) >= 0 and sum(seg[f"{p}_s"] for p in PARTS) <= seg["wall_s"] + 1e-6
