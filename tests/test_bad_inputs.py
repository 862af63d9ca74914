"""Issue 20: every bad input of its table (and the cases that already worked) behaves as
bench/bad_inputs.py publishes, plus the pieces behind them checked on their own: config type
checks, stage markers that vouch for their outputs, stray temporary files, the runner's -p."""
import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

from data_prep import sources, stages
from gmlib import atomic, checks
from helpers import REPO, load_script

bench = load_script("bench/bad_inputs.py")


@pytest.mark.parametrize("c", bench.CASES, ids=[c["fn"].__name__ for c in bench.CASES])
def test_published_case(c, tmp_path):
    rec = bench.run_case(c, tmp_path)
    if not rec["ok"] and "no shared data folder" in rec["message"]:
        pytest.skip("no shared corpus (GM_DATA_DIR)")
    assert rec["ok"], rec


def test_the_record_covers_the_issue():
    assert len(bench.CASES) >= 30 and len({c["case"] for c in bench.CASES}) == len(bench.CASES)
    assert sum(c["known_good"] for c in bench.CASES) >= 10   # the cases that already worked stay in the record


# --- the pieces on their own ----------------------------------------------------------------

@dataclass
class Toy:
    n: int = 1
    x: float = 0.5
    name: str | None = None
    roles: tuple = ("a",)
    w: dict = field(default_factory=dict)
    flag: bool = False


@pytest.mark.parametrize("kw, needle", [({"n": "two"}, "Toy.n='two': expected int"), ({"n": True}, "Toy.n=True"),
                                        ({"n": 1.5}, "Toy.n=1.5"), ({"x": "big"}, "Toy.x='big': expected float"),
                                        ({"name": 3}, "Toy.name=3"), ({"roles": "abc"}, "Toy.roles='abc'"),
                                        ({"w": []}, "Toy.w=[]"), ({"flag": 1}, "Toy.flag=1")])
def test_check_types_names_the_field(kw, needle):
    with pytest.raises(ValueError) as e:
        checks.check_types(Toy(**kw), "Toy")
    assert needle in str(e.value)


def test_check_types_accepts_what_yaml_gives():
    checks.check_types(Toy(n=3, x=2, name="a", roles=["a", "b"], w={"a": 1}), "Toy")  # int for float, list for tuple
    checks.check_types(Toy(n=np.int64(3), x=np.float32(0.5)), "Toy")                  # numpy scalars
    checks.at_least(Toy(n=1), "Toy", n=1)
    with pytest.raises(ValueError, match=r"Toy.x=1.5: must be a fraction in \[0, 1\]"):
        checks.fractions(Toy(x=1.5), "Toy", "x")


def test_marker_vouches_for_its_outputs(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("hello\n")
    marker = tmp_path / "a.done.json"
    meta = stages.finish(marker, "h1", {"n": 1}, outputs=[out])
    assert meta["outputs"] == {"a.txt": {"bytes": 6, "sha256": stages.file_record(out)["sha256"]}}
    said = []
    assert stages.done(marker, "h1", said.append)["n"] == 1 and not said
    assert stages.done(marker, "h2", said.append) is None and not said  # other parameters: silently redone
    for damage, needle in [(lambda: out.write_text("hellO\n"), "changed"), (lambda: out.write_text(""), "(empty)"),
                           (lambda: out.write_text("hi"), "has 2 bytes, 6 when written"), (out.unlink, "missing")]:
        damage()
        assert stages.done(marker, "h1", said.append) is None
        assert needle in said[-1] and str(out) in said[-1] and "rebuilding" in said[-1]
    marker.write_text("{half")
    assert stages.done(marker, "h1", said.append) is None and "unreadable stage marker" in said[-1]


def test_stray_temporary_files_are_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(tmp_path / "sub" / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("a crash that python sees: atomic_path cleans up itself")
    assert not list(tmp_path.rglob("*.tmp"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "sub" / f".x.bin.{dead}.k3j2_a.tmp").write_bytes(b"left by kill -9")
    (tmp_path / "sub" / f".y.bin.{os.getpid()}.k3j2_a.tmp").write_bytes(b"a live writer's")
    (tmp_path / "sub" / ".z.bin.k3j2.tmp").write_bytes(b"no writer named: stale")
    (tmp_path / "keep.tmp").write_bytes(b"not ours: no leading dot")
    assert sorted(p.name for p in atomic.remove_stale(tmp_path)) == [f".x.bin.{dead}.k3j2_a.tmp", ".z.bin.k3j2.tmp"]
    assert (tmp_path / "keep.tmp").is_file() and (tmp_path / "sub" / f".y.bin.{os.getpid()}.k3j2_a.tmp").is_file()
    assert atomic.remove_stale(tmp_path / "none") == []


def _gz(path, data: bytes):
    path.write_bytes(gzip.compress(data, mtime=0))
    return path


def test_reader_bom_surrogate_crc_and_empty(tmp_path):
    recs = [json.dumps({"text": f"документ {i}"}, ensure_ascii=False).encode() + b"\n" for i in range(3)]
    st = sources.ReadStats()
    got = list(sources.iter_records(_gz(tmp_path / "bom.jsonl.gz", b"\xef\xbb\xbf" + b"".join(recs)), stats=st))
    assert [r["text"] for r in got] == [f"документ {i}" for i in range(3)] and st.bad_json == 0
    plain = tmp_path / "bom.jsonl"
    plain.write_bytes(b"\xef\xbb\xbf" + b"".join(recs))
    assert len(list(sources.iter_records(plain))) == 3
    st = sources.ReadStats()
    p = _gz(tmp_path / "s.jsonl.gz", recs[0] + b'{"text": "a\\ud800b", "id": "\\udc00"}\n')
    got = list(sources.iter_records(p, stats=st))
    assert got[1] == {"text": "a\ufffdb", "id": "\ufffd"} and st.undecodable_lines == 1 and f"{p}:2" in st.errors[0]
    got[1]["text"].encode("utf-8")  # now writable as UTF-8
    gz = bytearray(gzip.compress(b"".join(recs), mtime=0))
    gz[-5] ^= 1  # the length field of the trailer
    st = sources.ReadStats()
    assert len(list(sources.iter_records(_write(tmp_path / "len.jsonl.gz", gz), stats=st))) == 3 and st.truncated == 1
    for name, data in [("zero.jsonl.gz", b""), ("nothing.jsonl.gz", gzip.compress(b"")), ("zero.jsonl", b"")]:
        st = sources.ReadStats()
        with pytest.warns(sources.SourceWarning, match=name):
            assert list(sources.iter_records(_write(tmp_path / name, data), stats=st)) == []
        assert st.empty_file == 1 and "empty file" in st.errors[0]


def _write(path, data):
    path.write_bytes(bytes(data))
    return path


def test_runner_passes_each_name_only_where_declared(tmp_path):
    rn = load_script("scripts/run_notebooks.py")
    nb = sorted((REPO / "notebooks").glob("0*.ipynb"))
    declared = {p.stem: rn.declared_params(p) for p in nb}
    assert "vocab_size" in declared["02_tokenizer"] and "vocab_size" not in declared["01_data"]
    assert all("run_name" in d for d in declared.values())
    file_params = {"max_steps": 5, "vocab_size": 3000}
    assert rn.notebook_params(nb[0], "r", None, file_params, {}) == {"run_name": "r"}
    with pytest.raises(SystemExit, match="'lr' is declared by none of the selected notebooks "
                                         "\\(01_data, 02_tokenizer\\); "
                                         "it is a parameter of 03_train_dense, 04_train_gm"):
        rn.check_shared(nb[:2], {"lr": 1e-3}, "-p", nb)


def test_training_clears_a_killed_save(tmp_path):
    from gmlib import train
    from gmlib.model import make_config
    bench._tiny_shards(tmp_path)
    ckpt = tmp_path / "models" / "m" / "checkpoint.safetensors"
    ckpt.parent.mkdir(parents=True)
    stray = ckpt.parent / ".checkpoint.safetensors.999999999.abcd_123.tmp"  # no such pid: its writer is dead
    stray.write_bytes(b"half a checkpoint")
    train.setup(make_config("tiny", vocab_size=300), train.TrainConfig(max_steps=1, batch_size=2, device="cpu"),
                tmp_path / "shards", ckpt_path=ckpt)
    assert not stray.exists()


def test_per_source_cleaning_settings_are_checked_too():
    from data_prep.prepare import DataConfig
    cfg = DataConfig(sources=["wiki_leipzig"], source_rules={"wiki_leipzig": {"min_line_punct": 2.0}})
    with pytest.raises(ValueError,
                       match=r"DataConfig.source_rules.wiki_leipzig.min_line_punct=2.0: must be a fraction"):
        cfg.validate()
