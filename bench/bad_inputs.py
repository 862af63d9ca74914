"""Bad input and interrupted runs, tried the way a new user would (issue 20), with the records.

  python bench/bad_inputs.py                 # both parts -> results/reliability/{bad_inputs,kill_resume}.json
  python bench/bad_inputs.py --cases-only    # the bad inputs only (about 20 s)
  python bench/bad_inputs.py --trials 12 --seed 0

Part 1, `CASES`: every bad input of the issue's table and the cases that already worked, each
run in a scratch folder of its own against the code users run (data_prep, the tokenizer, the
shards, the checkpoints, the expert store, scripts/run_notebooks.py). A case returns what
happened and the message; it is `ok` when that is the expected behaviour: a clear error that
names the file or parameter, a skip counted in the read stats and the audit, or a stage rebuilt.
tests/test_bad_inputs.py runs the same cases, so the published record and the test suite agree.

Part 2, `kill_resume`: one uninterrupted run of notebooks 01-04 on demo-size data (eight
sources, 100 KB each) is the reference; then each trial copies the reference's state from before
one notebook into a scratch folder, starts that notebook through run_notebooks.py, SIGKILLs the
runner at a seeded random moment while it writes its outputs (a random delay of up to 0.1 s
after a random one of the writes the reference run made; the runner's watchdog then kills the
kernel and its workers), reruns it, and compares its outputs with the reference: text and token
files byte for byte, .npz arrays, checkpoint and expert tensors (timings in JSON markers are
left out, since they differ on every run).
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep import audit, prepare, shards, sources, tokenizer  # noqa: E402
from data_prep.clean import CleanConfig  # noqa: E402
from gmlib import atomic  # noqa: E402
from gmlib.paths import data_dir, results_dir  # noqa: E402

SRC = "wiki_leipzig"   # the source the reading cases impersonate (role wiki: no quality rules)
N_DOCS = 40
CASES = []


def case(name: str, expected: str, known_good: bool = False):
    """Register fn(tmp: Path) -> (outcome, message) in the current GROUP; it raises
    AssertionError when the behaviour is not the expected one."""
    def deco(fn):
        CASES.append({"case": name, "group": GROUP, "expected": expected, "known_good": known_good, "fn": fn})
        return fn
    return deco


def error_of(call, exc, *needles) -> tuple[str, str]:
    """('error', message) when call() raises `exc` whose message holds every needle."""
    try:
        call()
    except exc as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        return "clear error", f"{type(e).__name__}: {msg}"
    raise AssertionError(f"no {exc.__name__} raised")


# --- scratch data -------------------------------------------------------------------------

_texts = []


def real_texts() -> list[str]:
    """N_DOCS real documents of SRC from the shared data folder (read once)."""
    if not _texts:
        root = data_dir()
        if root is None:
            raise RuntimeError("no shared data folder (set GM_DATA_DIR)")
        for rec in sources.iter_records(root / sources.SOURCES[SRC].relpath):
            if len(rec["text"].split()) >= 8:
                _texts.append(rec["text"])
            if len(_texts) == N_DOCS:
                break
    return list(_texts)


def lines(texts=None) -> list[bytes]:
    return [(json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n").encode()
            for i, t in enumerate(texts if texts is not None else real_texts())]


def write_source(root: Path, data: bytes, name: str = SRC, raw: bool = False) -> Path:
    """Put `data` (gzipped unless raw) where the loader looks for source `name` under root."""
    p = root / sources.SOURCES[name].relpath
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if raw else gzip.compress(data, mtime=0))
    return p


def data_cfg(root: Path, names=(SRC,), **kw) -> prepare.DataConfig:
    kw = {"max_bytes_per_source": None, "val_frac": 0.2, "test_frac": 0.2, "workers": 1, **kw}
    return prepare.DataConfig(data_name="bad", sources=list(names), data_root=str(root), **kw)


def run_prepare(tmp: Path, cfg=None, log=None):
    """Stage 01 into tmp/clean and its audit; log lines collected in the returned list."""
    said = []
    res = prepare.prepare(cfg or data_cfg(tmp / "data"), tmp / "clean", log=log or said.append)
    return audit.build(res, "bad"), said


def read(path) -> tuple[list, sources.ReadStats]:
    st = sources.ReadStats()
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        recs = list(sources.iter_records(path, stats=st))
    st.warned = [str(x.message) for x in w]
    return recs, st


# --- reading ------------------------------------------------------------------------------

GROUP = "reading a source"

def _empty(tmp, data, raw):
    write_source(tmp / "data", data, raw=raw)
    A, said = run_prepare(tmp)
    t = audit.source_table(A).set_index("source")
    assert A["sources"][SRC]["read_issues"]["empty_file"] == 1 and t.loc[SRC, "read_skips"] == 1
    assert any("empty file" in s for s in said), said
    return "counted skip", [s for s in said if "empty file" in s][0]


@case("zero-byte .jsonl.gz", "warning; counted in the audit's read_skips")
def zero_byte(tmp):
    return _empty(tmp, b"", raw=True)


@case("gzip of nothing", "warning; counted in the audit's read_skips")
def gzip_of_nothing(tmp):
    return _empty(tmp, b"", raw=False)


@case("complete gzip with a bad CRC", "the records kept; counted as a corrupt gzip, not an aborted run")
def bad_crc(tmp):
    gz = bytearray(gzip.compress(b"".join(lines()), mtime=0))
    gz[-8] ^= 0xFF  # the CRC-32 in the trailer
    p = write_source(tmp / "data", bytes(gz), raw=True)
    recs, st = read(p)
    assert st.truncated == 1 and len(recs) == N_DOCS and "CRC" in st.errors[0], st
    A, _ = run_prepare(tmp)
    assert A["sources"][SRC]["read_issues"]["truncated"] == 1
    return "counted skip", st.errors[0]


@case("UTF-8 byte-order mark at the start", "the first record kept")
def bom(tmp):
    ls = lines()
    p = write_source(tmp / "data", b"\xef\xbb\xbf" + b"".join(ls))
    recs, st = read(p)
    assert len(recs) == N_DOCS and st.bad_json == 0 and recs[0]["text"] == real_texts()[0]
    return "handled", f"{len(recs)} of {N_DOCS} records read, bad_json {st.bad_json}"


@case("a lone surrogate (\\ud800) in a text", "replaced and counted with file and line; the stage runs")
def surrogate(tmp):
    ls = lines()
    ls[3] = ls[3].replace(b'"text": "', b'"text": "\\ud800', 1)
    p = write_source(tmp / "data", b"".join(ls))
    recs, st = read(p)
    assert st.undecodable_lines == 1 and f"{p}:4" in st.errors[0] and "\ufffd" in recs[3]["text"]
    A, _ = run_prepare(tmp)
    assert A["sources"][SRC]["read_issues"]["undecodable_lines"] == 1
    return "counted skip", st.errors[0]


@case("undecodable bytes in a line", "replaced (U+FFFD) and counted", known_good=True)
def undecodable(tmp):
    ls = lines()
    ls[2] = ls[2].replace(b'"text": "', b'"text": "\xff\xfe', 1)
    recs, st = read(write_source(tmp / "data", b"".join(ls)))
    assert st.undecodable_lines == 1 and len(recs) == N_DOCS
    return "counted skip", st.errors[0]


@case("a truncated gzip", "what came before kept; counted", known_good=True)
def truncated_gzip(tmp):
    gz = gzip.compress(b"".join(lines()), mtime=0)
    recs, st = read(write_source(tmp / "data", gz[:len(gz) // 2], raw=True))
    assert st.truncated == 1 and 0 < len(recs) < N_DOCS
    return "counted skip", st.errors[0]


@case("a plain file named .gz", "clear error naming the file", known_good=True)
def plain_gz(tmp):
    p = write_source(tmp / "data", b"".join(lines()), raw=True)
    return error_of(lambda: read(p), sources.SourceError, str(p), "not a gzip file")


@case("a line that is not JSON", "skipped and counted with file and line", known_good=True)
def not_json(tmp):
    ls = lines()
    ls.insert(5, b"{broken\n")
    p = write_source(tmp / "data", b"".join(ls))
    recs, st = read(p)
    assert st.bad_json == 1 and len(recs) == N_DOCS and f"{p}:6" in st.errors[0]
    return "counted skip", st.errors[0]


@case("a record without `text`", "skipped and counted", known_good=True)
def no_text(tmp):
    ls = lines()
    ls.insert(1, b'{"id": "x"}\n')
    recs, st = read(write_source(tmp / "data", b"".join(ls)))
    assert st.no_text == 1 and len(recs) == N_DOCS
    return "counted skip", st.errors[0]


@case("a missing source, on_missing='error'", "clear error naming the source and the path", known_good=True)
def missing_error(tmp):
    (tmp / "data").mkdir()
    return error_of(lambda: run_prepare(tmp), sources.SourceError, repr(SRC), str(tmp / "data"))


@case("a missing source, on_missing='skip'", "counted as missing in the audit", known_good=True)
def missing_skip(tmp):
    write_source(tmp / "data", b"".join(lines()))
    A, _ = run_prepare(tmp, data_cfg(tmp / "data", names=(SRC, "news_rt"), on_missing="skip"))
    assert A["sources"]["news_rt"]["missing"] == 1 and A["sources"][SRC]["docs_out"] > 0
    return "counted skip", A["sources"]["news_rt"].get("missing_reason", "missing: 1")


# --- stages and their markers -------------------------------------------------------------

GROUP = "stage outputs"

def _built(tmp) -> tuple[Path, Path]:
    """A finished stage 01 (and a tokenizer + shards) in tmp/clean, tmp/tok.model, tmp/shards."""
    write_source(tmp / "data", b"".join(lines()))
    run_prepare(tmp)
    return tmp / "clean", tmp / "tok.model"


def _tokenized(tmp):
    clean_dir, model = _built(tmp)
    tokenizer.train_on_split(clean_dir, model, tokenizer.TokenizerConfig(vocab_size=400, num_threads=1))
    shards.tokenize_all(clean_dir, model, tmp / "shards", shards.ShardConfig(workers=1), log=lambda *_: None)
    return clean_dir, model


def _rebuilt(tmp, path, damage, rerun, what) -> tuple[str, str]:
    """Damage an output, rerun, check the stage said so and gave back the same content."""
    said = []
    before = {p: _digest(p) for p in path.parent.iterdir() if p.is_file() and p.suffix != ".json"}
    damage()
    rerun(said.append)
    assert any("rebuilding" in s for s in said), said
    after = {p: _digest(p) for p in before}
    assert after == before, f"{what}: rebuilt output differs"
    return "rebuilt", [s for s in said if "rebuilding" in s][0]


@case("a zero-byte train shard, then 02 again", "the shards rebuilt, TokenShards reads them")
def zero_shard(tmp):
    from gmlib.data import TokenShards
    clean_dir, model = _tokenized(tmp)
    shard = tmp / "shards" / "train" / "shard_00000.bin"
    ref = shard.read_bytes()
    shard.write_bytes(b"")
    said = []
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        shards.tokenize_all(clean_dir, model, tmp / "shards", shards.ShardConfig(workers=1), log=said.append)
    assert shard.read_bytes() == ref and TokenShards(tmp / "shards" / "train").n_docs > 0
    msg = [s for s in buf.getvalue().splitlines() if "rebuilding" in s]
    assert msg, buf.getvalue()
    return "rebuilt", msg[0]


@case("a zero-byte tokenizer.model with its marker present", "retrained, and said so")
def zero_tokenizer(tmp):
    clean_dir, model = _tokenized(tmp)
    ref = model.read_bytes()
    model.write_bytes(b"")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tokenizer.train_on_split(clean_dir, model, tokenizer.TokenizerConfig(vocab_size=400, num_threads=1))
    tokenizer.load(model)
    assert "rebuilding" in buf.getvalue() and len(model.read_bytes()) == len(ref)
    return "rebuilt", buf.getvalue().strip().splitlines()[0]


@case("loading a zero-byte tokenizer.model", "clear error naming the file")
def load_zero_tokenizer(tmp):
    p = tmp / "tokenizer.model"
    p.write_bytes(b"")
    return error_of(lambda: tokenizer.load(p), ValueError, str(p), "not a usable SentencePiece model")


@case("a truncated intermediate filtered/*.jsonl", "the filter stage rebuilt; same output")
def truncated_filtered(tmp):
    clean_dir, _ = _built(tmp)
    p = clean_dir / "filtered" / f"{SRC}.jsonl"

    def damage():
        p.write_bytes(p.read_bytes()[:-100])
    return _rebuilt(tmp, p, damage, lambda log: run_prepare(tmp, log=log), "filtered jsonl")


@case("a zero-byte filtered/*.npz", "the filter stage rebuilt")
def zero_npz(tmp):
    clean_dir, _ = _built(tmp)
    p = clean_dir / "filtered" / f"{SRC}.npz"

    def damage():
        p.write_bytes(b"")
    return _rebuilt(tmp, p, damage, lambda log: run_prepare(tmp, log=log), "filtered npz")


@case("a deleted clean/val file", "the split stage rebuilt")
def deleted_split(tmp):
    clean_dir, _ = _built(tmp)
    p = clean_dir / "val" / f"{SRC}.jsonl"
    ref = p.read_bytes()
    p.unlink()
    said = []
    run_prepare(tmp, log=said.append)
    assert p.read_bytes() == ref and any("missing; rebuilding" in s for s in said), said
    return "rebuilt", [s for s in said if "rebuilding" in s][0]


@case("an edited clean/train file (same size)", "the split stage rebuilt")
def edited_split(tmp):
    clean_dir, _ = _built(tmp)
    p = clean_dir / "train" / f"{SRC}.jsonl"

    def damage():
        b = bytearray(p.read_bytes())
        b[20] = ord("X") if b[20] != ord("X") else ord("Y")
        p.write_bytes(bytes(b))
    return _rebuilt(tmp, p, damage, lambda log: run_prepare(tmp, log=log), "train split")


@case("reading a truncated intermediate directly", "clear error naming the file and line")
def read_truncated_intermediate(tmp):
    clean_dir, _ = _built(tmp)
    p = clean_dir / "train" / f"{SRC}.jsonl"
    p.write_bytes(p.read_bytes()[:-30])
    return error_of(lambda: list(prepare.iter_split(clean_dir, "train")), ValueError, str(p))


@case("a stray .tmp file after kill -9", "removed on the rerun, and said so")
def stray_tmp(tmp):
    clean_dir, _ = _built(tmp)
    stray = clean_dir / "filtered" / f".{SRC}.jsonl.abc123.tmp"
    stray.write_bytes(b"half a file")
    said = []
    run_prepare(tmp, log=said.append)
    assert not stray.exists() and any("temporary file" in s for s in said), said
    return "cleaned", [s for s in said if "temporary file" in s][0]


# --- configs ------------------------------------------------------------------------------

GROUP = "configs"

def _cfg_error(tmp, needles, **kw):
    def go():
        cfg = data_cfg(tmp / "data", **{k: v for k, v in kw.items() if k != "clean"})
        if "clean" in kw:
            cfg.clean = CleanConfig(**kw["clean"])
        cfg.validate()
    return error_of(go, ValueError, *needles)


@case("the same source listed twice", "clear error naming the source")
def twice(tmp):
    return _cfg_error(tmp, [SRC, "more than once"], names=(SRC, "news_rt", SRC))


@case("max_bytes_per_source=-100", "clear error naming the parameter")
def negative_bytes(tmp):
    return _cfg_error(tmp, ["max_bytes_per_source", ">= 1"], max_bytes_per_source=-100)


@case("quality_roles=('scoial',)", "clear error naming the role and the known ones")
def bad_role(tmp):
    return _cfg_error(tmp, ["quality_roles", "scoial", "social"], clean={"quality_roles": ("scoial",)})


@case("min_line_punct=2.0", "clear error: a fraction in [0, 1]")
def bad_fraction(tmp):
    return _cfg_error(tmp, ["min_line_punct", "[0, 1]"], clean={"min_line_punct": 2.0})


@case('workers="two"', "clear error naming the parameter and the type")
def workers_str(tmp):
    return _cfg_error(tmp, ["workers", "expected int"], workers="two")


@case("an unknown source name", "clear error listing the known sources", known_good=True)
def unknown_source(tmp):
    return _cfg_error(tmp, ["wiki_leipzig_typo", "known"], names=("wiki_leipzig_typo",))


@case("val_frac + test_frac > 1", "clear error", known_good=True)
def bad_split(tmp):
    return _cfg_error(tmp, ["frac"], val_frac=0.7, test_frac=0.6)


@case("vocab_size 100", "clear error naming vocab_size and its range")
def vocab_small(tmp):
    return error_of(lambda: tokenizer.TokenizerConfig(vocab_size=100), ValueError, "vocab_size=100", "[300, 256000]")


@case('vocab_size "big"', "clear error naming vocab_size and the type")
def vocab_str(tmp):
    return error_of(lambda: tokenizer.TokenizerConfig(vocab_size="big"), ValueError, "vocab_size='big'", "expected int")


@case("a model vocabulary smaller than the shards'", "clear error naming the shards and the sizes", known_good=True)
def vocab_too_large(tmp):
    from gmlib import train
    from gmlib.data import WindowSampler
    from gmlib.model import make_config
    ts = _tiny_shards(tmp, vocab=500)
    return error_of(lambda: train.check_data(make_config("tiny", vocab_size=300), WindowSampler(ts, 16, 2)),
                    ValueError, str(ts.root), "500")


# --- scripts/run_notebooks.py -------------------------------------------------------------

GROUP = "run_notebooks.py"

def _runner():
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@case("-p vocab_size 3000 --only 01 02", "reaches 02 only")
def p_only_declared(tmp):
    rn = _runner()
    nb = {n: REPO / "notebooks" / f"{n}.ipynb" for n in ("01_data", "02_tokenizer")}
    p01 = rn.notebook_params(nb["01_data"], "r", None, {}, {"vocab_size": 3000})
    p02 = rn.notebook_params(nb["02_tokenizer"], "r", None, {}, {"vocab_size": 3000})
    assert "vocab_size" not in p01 and p02["vocab_size"] == 3000
    return "handled", f"01_data gets {sorted(p01)}; 02_tokenizer gets {sorted(p02)}"


def _runner_exit(args) -> tuple[str, str]:
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "run_notebooks.py"), *args], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0, p.stdout
    return p.stderr.strip().splitlines()[-1]


@case("-p vocab_size 3000 --only 01", "refused before running, naming the notebook that declares it")
def p_refused(tmp):
    msg = _runner_exit(["--run-name", "x", "--only", "01", "-p", "vocab_size", "3000"])
    assert "vocab_size" in msg and "02_tokenizer" in msg, msg
    return "clear error", msg


@case("a misspelt -p name (vocab_sise)", "refused before running: no notebook has it", known_good=True)
def p_misspelt(tmp):
    msg = _runner_exit(["--run-name", "x", "--only", "02", "-p", "vocab_sise", "3000"])
    assert "vocab_sise" in msg and "no notebook has it" in msg, msg
    return "clear error", msg


SLEEPER = '''import os, time, multiprocessing as mp
from pathlib import Path
def _sleep(_):
    Path(pid_dir, f"worker.{os.getpid()}").write_text("")
    time.sleep(300)
pool = mp.get_context("fork").Pool(1)
pending = pool.map_async(_sleep, [0])
Path(pid_dir, f"kernel.{os.getpid()}").write_text("")
time.sleep(300)'''


def sleeper_notebook(folder: Path) -> Path:
    """A notebook whose kernel starts a pool worker, both writing their pids, then waits."""
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('run_name = "x"\npid_dir = "."', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(SLEEPER)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "01_sleep.ipynb")
    return folder


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running: only its parent's wait is missing
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def kill_runner_trial(tmp: Path, sig=signal.SIGKILL) -> dict:
    """Start run_notebooks.py on the sleeper, signal the runner alone, see who survives."""
    pids = tmp / "pids"
    pids.mkdir(parents=True)
    env = {**os.environ, "GM_RESULTS_DIR": str(tmp / "results")}
    p = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--run-name", "k",
                          "--notebooks", str(sleeper_notebook(tmp / "nb")), "-p", "pid_dir", str(pids)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(list(pids.iterdir())) < 2:
        assert time.time() - t0 < 60 and p.poll() is None, "the sleeper did not start"
        time.sleep(0.1)
    started = {f.name.split(".")[0]: int(f.name.split(".")[1]) for f in pids.iterdir()}
    os.kill(p.pid, sig)
    p.wait()
    t1 = time.time()
    while any(alive(x) for x in started.values()) and time.time() - t1 < 10:
        time.sleep(0.1)
    left = {k: x for k, x in started.items() if alive(x)}
    for x in left.values():  # do not leave them to the next case
        os.kill(x, signal.SIGKILL)
    return {"started": started, "left": left, "seconds_to_clean": round(time.time() - t1, 2)}


@case("killing only run_notebooks.py (SIGKILL)", "its kernel and pool worker stop too")
def kill_runner(tmp):
    r = kill_runner_trial(tmp, signal.SIGKILL)
    assert not r["left"], r
    return "handled", f"kernel and worker gone {r['seconds_to_clean']} s after the runner"


@case("interrupting run_notebooks.py (SIGTERM)", "its kernel and pool worker stop too")
def term_runner(tmp):
    r = kill_runner_trial(tmp, signal.SIGTERM)
    assert not r["left"], r
    return "handled", f"kernel and worker gone {r['seconds_to_clean']} s after the runner"


# --- the training side --------------------------------------------------------------------

GROUP = "training side"

def _tiny_shards(tmp, vocab=300):
    from gmlib.data import ShardWriter, TokenShards
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        with ShardWriter(tmp / "shards" / split, vocab_size=vocab, sources=["a"]) as w:
            for _ in range(20):
                w.add(rng.integers(0, vocab, 100), nbytes=300)
    return TokenShards(tmp / "shards" / "train")


def _ckpt(tmp, **over):
    from gmlib.checkpoint import save_checkpoint
    from gmlib.model import GPT, make_config
    import torch
    torch.manual_seed(0)
    m = GPT(make_config("tiny", vocab_size=300, **over))
    return save_checkpoint(tmp / "checkpoint.safetensors", m, meta={"step": 0}), m


@case("a zero-byte checkpoint", "clear error naming the file")
def zero_ckpt(tmp):
    from gmlib.checkpoint import load_model
    p, _ = _ckpt(tmp)
    p.write_bytes(b"")
    return error_of(lambda: load_model(p), ValueError, str(p), "unreadable checkpoint")


@case("a truncated checkpoint", "clear error naming the file", known_good=True)
def truncated_ckpt(tmp):
    from gmlib.checkpoint import load_model
    p, _ = _ckpt(tmp)
    p.write_bytes(p.read_bytes()[:5000])
    return error_of(lambda: load_model(p), ValueError, str(p), "truncated")


@case("a checkpoint from another config, resumed", "clear error naming the file and both configs", known_good=True)
def other_ckpt(tmp):
    from gmlib import train
    from gmlib.model import make_config
    p, _ = _ckpt(tmp, n_layer=1)
    _tiny_shards(tmp)
    cfg = train.TrainConfig(max_steps=2, batch_size=2, device="cpu")
    return error_of(lambda: train.setup(make_config("tiny", vocab_size=300), cfg, tmp / "shards", ckpt_path=p),
                    ValueError, str(p), "differs")


@case("a truncated expert-store file", "the previous good version used, with a warning naming the file",
      known_good=True)
def truncated_expert(tmp):
    import torch
    import warnings
    from gmlib.store import ExpertStore
    v = {1: {"model.w": torch.ones(64, 64)}, 2: {"model.w": torch.full((64, 64), 2.0)}}
    with ExpertStore(tmp / "store", ram_bytes=1 << 20, gpu_bytes=1 << 20) as st:
        st.put("e", v[1], durable=True)
        st.flush()
        st.put("e", v[2], durable=True)
    newest = tmp / "store" / "e" / "v000002.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    with ExpertStore(tmp / "store", ram_bytes=1 << 20, gpu_bytes=1 << 20) as st, \
            warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got, _ = st.get("e")
    assert torch.equal(got["model.w"], v[1]["model.w"]) and str(newest) in str(w[0].message)
    return "handled", str(w[0].message)


@case("an empty expert-store manifest", "clear error naming the manifest")
def empty_manifest(tmp):
    import torch
    from gmlib.store import ExpertStore, StoreError
    with ExpertStore(tmp / "store", ram_bytes=1 << 20, gpu_bytes=1 << 20) as st:
        st.put("e", {"model.w": torch.ones(8)}, durable=True)
    (tmp / "store" / "e" / "manifest.json").write_bytes(b"")
    st = ExpertStore(tmp / "store", ram_bytes=1 << 20, gpu_bytes=1 << 20)
    try:
        return error_of(lambda: st.get("e"), StoreError, "manifest.json", "unreadable")
    finally:
        st.close(flush=False)


@case("a gm folder made with another config", "clear error naming the file and the settings", known_good=True)
def other_gm(tmp):
    from gmlib import gm
    _tiny_shards(tmp)
    cfg = gm.GMConfig(n_experts=2, model_size="tiny", tokens=1000, device="cpu")
    out = tmp / "gm"
    out.mkdir()
    atomic.write_json(out / "config.json", {"config": {**cfg.to_dict(), "n_experts": 3}})
    return error_of(lambda: gm.train_gm(cfg, tmp / "shards", out, verbose=False), ValueError,
                    "config.json", "n_experts")


@case("an empty gm config.json", "clear error naming the file")
def empty_gm_config(tmp):
    from gmlib import gm
    _tiny_shards(tmp)
    cfg = gm.GMConfig(n_experts=2, model_size="tiny", tokens=1000, device="cpu")
    (tmp / "gm").mkdir()
    (tmp / "gm" / "config.json").write_bytes(b"")
    return error_of(lambda: gm.train_gm(cfg, tmp / "shards", tmp / "gm", verbose=False), ValueError,
                    "config.json", "unreadable")


@case("a params file naming a missing data folder", "clear error naming the folder")
def missing_data_folder(tmp):
    from gmlib import train
    from gmlib.model import make_config
    cfg = train.TrainConfig(max_steps=2, batch_size=2, device="cpu")
    missing = tmp / "no_such_data" / "shards"
    return error_of(lambda: train.setup(make_config("tiny", vocab_size=300), cfg, missing), FileNotFoundError,
                    str(missing / "train"))


@case("a GPU asked for where none exists (device='cuda:99')", "clear error, not a CUDA trace")
def no_gpu(tmp):
    from gmlib import train
    return error_of(lambda: train.resolve_device("cuda:99"), RuntimeError, "cuda:99")


def run_case(c: dict, scratch: Path) -> dict:
    """One case in its own scratch folder; the record published for it."""
    tmp = scratch / c["fn"].__name__
    tmp.mkdir(parents=True)
    rec = {"case": c["case"], "group": c["group"], "expected": c["expected"], "known_good": c["known_good"]}
    try:
        outcome, message = c["fn"](tmp)
        rec.update(outcome=outcome, message=message, ok=True)
    except AssertionError as e:
        rec.update(outcome="unexpected behaviour", message=str(e), ok=False)
    except Exception as e:  # noqa: BLE001  (the record says what went wrong instead)
        rec.update(outcome="unexpected exception", message=f"{type(e).__name__}: {e}", ok=False)
    rec["message"] = rec["message"].replace(str(scratch), "<scratch>")
    return rec


def run_cases(scratch: Path) -> list[dict]:
    out = []
    for c in CASES:
        t0 = time.time()
        out.append(run_case(c, scratch))
        print(f"{'ok ' if out[-1]['ok'] else 'BAD'} {c['case']:60s} {time.time() - t0:5.1f} s  "
              f"{out[-1]['message'][:90]}", flush=True)
    return out


# --- part 2: kill and resume --------------------------------------------------------------

STAGES = {"01": "01_data", "02": "02_tokenizer", "03": "03_train_dense", "04": "04_train_gm"}
DEMO = {  # demo-size: eight sources of 100 KB, a 600-piece tokenizer, 60 steps of the tiny model
    "01": {"sources": "[blogs_habr, books_progit2_ru, books_ruslit, news_rt, social_ruarg_comments, "
                      "social_telegram_news, wiki_articles_xlplagiarism, wiki_leipzig]",
           "max_bytes_per_source": "100000"},
    "02": {"vocab_size": "600"},
    "03": {"max_steps": "60", "ckpt_every": "10", "eval_every": "30"},
    # 04: 03's budget, since the gm's seed is 03's branch checkpoint (seed_from)
    "04": {"tokens": str(60 * 8 * 128), "n_experts": "2", "segment_steps": "10", "compare_routers": "false"}}


def _digest(p: Path) -> str:
    """A hash of what a file holds: arrays for .npz/.npy (zip entries carry a time), tensors
    for .safetensors (the header carries timings), bytes for the rest."""
    h = hashlib.sha256()
    if p.suffix == ".npz":
        with np.load(p) as z:
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
    elif p.suffix == ".npy":
        h.update(np.ascontiguousarray(np.load(p)).tobytes())
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file
        for k, v in sorted(load_file(p).items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
    else:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _newest_versions(files):
    """Of an expert store's vNNNNNN.safetensors, only the newest per expert (a killed run may
    leave one more old version than an uninterrupted one)."""
    best = {}
    for f in files:
        if f.parent.parent.name == "store" and f.name.startswith("v") and f.suffix == ".safetensors":
            key = f.parent
            if key not in best or f.name > best[key].name:
                best[key] = f
        else:
            best[f] = f
    return sorted(best.values())


def stage_files(work: Path, stage: str) -> list[Path]:
    """A stage's output files, JSON (timings) and stray temporary files left out."""
    d = work / "kr"
    roots = {"01": [d / "clean"], "02": [d / "shards", d / "tokenizer.model"], "03": [d.parent / "kr_run" / "models"],
             "04": [d.parent / "kr_run" / "gm"]}[stage]
    files = []
    for r in roots:
        files += [r] if r.is_file() else [p for p in r.rglob("*") if p.is_file()]
    return [f for f in files if f.suffix not in (".json", ".tmp", ".corrupt") and not f.name.startswith(".")]


def fingerprint(work: Path, stage: str) -> dict:
    return {str(f.relative_to(work)): _digest(f) for f in _newest_versions(stage_files(work, stage))}


def run_stage(work: Path, stage: str, kill_after: tuple | None = None) -> dict:
    """Run one notebook through run_notebooks.py with work/ and results/ in `work`, counting
    the writes of its outputs it sees (a file appearing or changing, polled every 20 ms); with
    kill_after=(k, delay), SIGKILL the runner `delay` seconds after the k-th write."""
    # one torch thread: less contention on a shared CPU (and the same arithmetic in every run)
    env = {**os.environ, "GM_WORK_DIR": str(work), "GM_RESULTS_DIR": str(work / "results"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--run-name", "kr_run", "--only", stage,
            "-p", "data_name", "kr", *[a for k, v in DEMO[stage].items() for a in ("-p", k, v)]]
    t0, writes, killed_at = time.time(), set(), None
    with open(work / f"runner_{stage}.log", "a") as log:
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        while p.poll() is None:
            for f in stage_files(work, stage):
                try:
                    writes.add((f, f.stat().st_mtime_ns))
                except FileNotFoundError:  # replaced between the listing and the stat
                    pass
            if kill_after and len(writes) >= kill_after[0]:
                time.sleep(kill_after[1])
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    killed_at = time.time() - t0
                p.wait()
                time.sleep(0.5)  # the watchdog's kill of the kernel and its workers
                break
            time.sleep(0.02)
    if not kill_after and p.returncode != 0:
        raise RuntimeError(f"{STAGES[stage]} failed; see {work / f'runner_{stage}.log'}:\n"
                           + (work / f"runner_{stage}.log").read_text()[-3000:])
    return {"seconds": round(time.time() - t0, 2), "writes": len(writes), "killed": killed_at is not None,
            "moment_s": None if killed_at is None else round(killed_at, 2)}


def temporaries(work: Path) -> list[str]:
    """atomic_path's temporary files under `work` (left only by a killed writer)."""
    return sorted(str(p.relative_to(work)) for p in work.rglob(".*.tmp"))


def kill_resume(scratch: Path, trials: int, seed: int) -> dict:
    """The reference run, then `trials` kills spread over 01-04 at seeded random moments."""
    rng = np.random.default_rng(seed)
    ref_work = scratch / "reference"
    before, ref, secs, writes = {}, {}, {}, {}
    ref_work.mkdir(parents=True)
    for st in STAGES:
        before[st] = scratch / f"before_{st}"
        shutil.copytree(ref_work, before[st])
        r = run_stage(ref_work, st)
        secs[st], writes[st], ref[st] = r["seconds"], r["writes"], fingerprint(ref_work, st)
        print(f"reference {STAGES[st]}: {secs[st]} s, {len(ref[st])} output files, {writes[st]} writes seen",
              flush=True)
    order = [list(STAGES)[i % len(STAGES)] for i in range(trials)]
    out = []
    for i, st in enumerate(order):
        work = scratch / f"trial_{i:02d}"
        shutil.copytree(before[st], work)
        # the moment: a random delay after a random one of the writes the reference run made,
        # so the kill lands while the stage writes (not while the kernel starts or figures draw)
        after, delay = int(rng.integers(1, writes[st] + 1)), float(rng.uniform(0.0, 0.1))
        k = run_stage(work, st, kill_after=(after, delay))
        strays, present = temporaries(work), len(_newest_versions(stage_files(work, st)))
        t0 = time.time()
        run_stage(work, st)
        got = fingerprint(work, st)
        diff = sorted(f for f in set(ref[st]) | set(got) if ref[st].get(f) != got.get(f))
        rec = {"trial": i, "stage": STAGES[st], "moment_s": k["moment_s"], "after_write": after,
               "delay_s": round(delay, 3), "reference_writes": writes[st], "reference_s": secs[st],
               "killed": k["killed"], "outputs_present_at_kill": present, "stray_tmp_after_kill": strays,
               "stray_tmp_after_rerun": temporaries(work),
               "rerun_s": round(time.time() - t0, 2), "files_compared": len(ref[st]), "differing": diff[:5],
               "result": "identical" if not diff else "differs"}
        out.append(rec)
        print(f"trial {i:2d} {STAGES[st]:15s} killed at {k['moment_s']} s "
              f"(write {after} of {writes[st]} + {delay:.2f} s): "
              f"{rec['result']}"
              f" ({present} of {len(ref[st])} files there at the kill; stray .tmp {strays}, "
              f"after the rerun {rec['stray_tmp_after_rerun']})",
              flush=True)
        shutil.rmtree(work)
    return {"trials": len(out), "identical": sum(r["result"] == "identical" for r in out),
            "killed_mid_run": sum(r["killed"] for r in out), "seed": seed, "reference_seconds": secs,
            "per_trial": out}


def summary(cases: list[dict], kr: dict | None) -> str:
    """The README's two short tables: cases per group, trials per stage."""
    lines = ["| bad input | cases | of which worked before | ok |", "|---|---|---|---|"]
    for g in dict.fromkeys(c["group"] for c in cases):
        cs = [c for c in cases if c["group"] == g]
        lines.append(f"| {g} | {len(cs)} | {sum(c['known_good'] for c in cs)} | {sum(c['ok'] for c in cs)} |")
    lines.append(f"| all | {len(cases)} | {sum(c['known_good'] for c in cases)} | {sum(c['ok'] for c in cases)} |")
    if kr:
        lines += ["", "| SIGKILL during | trials | at (s) | uninterrupted run (s) | after output write "
                  "| resumed output identical |", "|---|---|---|---|---|---|"]
        for st, secs in kr["reference_seconds"].items():
            ts = [t for t in kr["per_trial"] if t["stage"] == STAGES[st]]
            moments = ", ".join(f"{t['moment_s']:.1f}" if t["killed"] else "not killed" for t in ts)
            present = ", ".join(f"{t['after_write']}/{t['reference_writes']}" for t in ts)
            lines.append(f"| {STAGES[st]} | {len(ts)} | {moments} | {secs:.1f} | {present} | "
                         f"{sum(t['result'] == 'identical' for t in ts)} of {len(ts)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases-only", action="store_true")
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the saved records")
    ap.add_argument("--out", type=Path, default=None, help="default: results/reliability/")
    args = ap.parse_args(argv)
    out = args.out or results_dir("reliability")
    if args.summary_only:
        recs, kr = (json.loads((out / f).read_text()) for f in ("bad_inputs.json", "kill_resume.json"))
        atomic.write_text(out / "summary.md", summary(recs, kr))
        return print(summary(recs, kr))
    with tempfile.TemporaryDirectory(prefix="gm_bad_inputs_") as scratch:
        recs = run_cases(Path(scratch) / "cases")
        atomic.write_json(out / "bad_inputs.json", recs)
        print(f"{sum(r['ok'] for r in recs)} of {len(recs)} cases ok -> {out / 'bad_inputs.json'}")
        if not args.cases_only:
            kr = kill_resume(Path(scratch) / "kill", args.trials, args.seed)
            atomic.write_json(out / "kill_resume.json", kr)
            print(f"{kr['identical']} of {kr['trials']} trials identical -> {out / 'kill_resume.json'}")
        atomic.write_text(out / "summary.md", summary(recs, None if args.cases_only else kr))
        print(summary(recs, None if args.cases_only else kr))
    ok = all(r["ok"] for r in recs) and (args.cases_only or kr["identical"] == kr["trials"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
