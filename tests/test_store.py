"""The expert store on CPU: exact round trips through every tier, LRU order and byte budgets,
exact byte accounting, damaged or half-written files, prefetch, the bf16 weights-only policy.
References are independent of the store: the tensors we put (compared bit for bit), sizes
computed from numel * element_size, and the safetensors library reading our files."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import gmlib.expert_files as files_mod
from gmlib.paths import REPO_ROOT
from gmlib.store import CorruptExpertWarning, ExpertStore, StoreError, buffer_bytes

SEED_EXPERTS = range(4)


def expert(seed: int, width: int = 17) -> dict:
    """Every dtype the trainer uses and some it doesn't, with bit patterns a sloppy copy would
    lose: NaN, -0.0, inf, subnormals, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(33, width, generator=g)
    w[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-42])
    return {
        "model.w": w,
        "model.norm": torch.randn(width, generator=g).to(torch.bfloat16),
        "model.h": torch.randn(5, 3, generator=g).half(),
        "model.d": torch.randn(7, generator=g, dtype=torch.float64),
        "model.i": torch.randint(-2**40, 2**40, (11,), generator=g),
        "model.mask": torch.rand(9, generator=g) > 0.5,
        "model.empty": torch.zeros(0, 4),
        "optim.w.exp_avg": torch.randn(33, width, generator=g),
        "optim.w.exp_avg_sq": torch.rand(33, width, generator=g),
        "optim.w.step": torch.tensor(float(seed + 1)),
    }


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def size_of(tensors) -> int:
    """Buffer bytes the store needs for an expert (for setting budgets in whole experts)."""
    return buffer_bytes(tensors)


def assert_same(got: dict, ref: dict):
    """Same keys, dtypes, shapes and bytes (NaN payloads and -0.0 included)."""
    assert sorted(got) == sorted(ref)
    for k in ref:
        a, b = got[k].cpu(), ref[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k


def test_round_trip_through_ram_and_disk_is_bit_identical(tmp_path):
    refs = {f"e{i}": expert(i) for i in SEED_EXPERTS}
    one = size_of(refs["e0"])
    st = ExpertStore(tmp_path, ram_bytes=2 * one, gpu_bytes=one)
    for name, ref in refs.items():
        st.put(name, {k: v.clone() for k, v in ref.items()}, meta={"name": name, "tokens": 123})
    assert st.resident("ram") == ["e2", "e3"]          # e0, e1 were written back to disk
    for name, ref in refs.items():
        got, meta = st.get(name)
        assert_same(got, ref)
        assert meta == {"name": name, "tokens": 123}
    st.close()
    # a fresh process's view: everything from disk, and the files read by the safetensors library
    st = ExpertStore(tmp_path, ram_bytes=2 * one, gpu_bytes=one)
    assert st.names() == sorted(refs)
    for name, ref in refs.items():
        assert_same(st.get(name)[0], ref)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        path = tmp_path / name / manifest["versions"][0]["file"]
        assert_same(load_file(path), ref)
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["meta"]) == {"name": name, "tokens": 123}
        assert_same(st.read(name)[0], ref)
    assert st.verify() == []
    st.close()


def test_lru_order_budgets_and_slot_reuse(tmp_path):
    refs = {n: expert(i) for i, n in enumerate("abcd")}
    one = size_of(refs["a"])
    st = ExpertStore(tmp_path, ram_bytes=3 * one, gpu_bytes=2 * one)
    budgets_ok = lambda: st.used_bytes("ram") <= 3 * one and st.used_bytes("dev") <= 2 * one  # noqa: E731
    for n in "abc":
        st.put(n, refs[n])
        assert budgets_ok()
    assert st.resident("ram") == ["a", "b", "c"] and st.resident("dev") == ["b", "c"]
    st.get("a")                                        # RAM hit: a becomes the most recent in RAM and on the device
    assert st.resident("ram") == ["b", "c", "a"] and st.resident("dev") == ["c", "a"]
    st.put("d", refs["d"])                             # evicts b from RAM (to disk) and c from the device
    assert st.resident("ram") == ["c", "a", "d"] and st.resident("dev") == ["a", "d"]
    assert budgets_ok()
    st.flush()
    assert (tmp_path / "b" / "manifest.json").is_file() and st.names() == list("abcd")
    # the last expert returned by get() is never evicted, even when it is the least recent
    st.get("a")
    st.prefetch("b")
    st.prefetch("c")
    assert "a" in st.resident("dev")
    # many swaps of same-size experts allocate nothing new on the device
    allocs = dict(st.stats.allocs)
    for i in range(20):
        n = "abcd"[i % 4]
        assert_same(st.get(n)[0], refs[n])
        assert budgets_ok()
    assert st.stats.allocs == allocs
    assert st.stats.allocs["dev"] == 2
    st.close()


def test_smaller_last_version_reuses_the_buffers_it_replaces(tmp_path):
    """The trainer's last segment of an expert stores its weights without the Adam moments: a
    version under half the size of the one it replaces. It goes into the replaced version's RAM
    buffer and GPU slot, as a new pinned RAM buffer costs about 0.2 s on the H200 machine."""
    full = expert(0)
    last = {k: v for k, v in expert(1).items() if k.startswith("model.")}
    assert 2 * size_of(last) < size_of(full)  # fits() alone would not reuse the buffer
    others = {n: expert(i) for i, n in enumerate("ab", start=2)}
    with ExpertStore(tmp_path, ram_bytes=4 * size_of(full), gpu_bytes=size_of(full)) as st:
        for n, t in others.items():
            st.put(n, t)
        st.put("e", full, durable=True)
        st.flush()  # its disk write is done, as a segment of training later (a buffer being written is not reused)
        allocs, used = dict(st.stats.allocs), {t: st.used_bytes(t) for t in ("ram", "dev")}
        st.put("e", expert(1), keep_optimizer=False, durable=True)
        assert st.stats.allocs == allocs and {t: st.used_bytes(t) for t in ("ram", "dev")} == used
        assert_same(st.get("e")[0], last)
        for n, t in others.items():
            assert_same(st.get(n)[0], t)
    reopened = ExpertStore(tmp_path, ram_bytes=4 * size_of(full), gpu_bytes=size_of(full))
    assert_same(reopened.get("e")[0], last)
    reopened.close()
    assert_same(load_file(tmp_path / "e" / "v000001.safetensors"), full)  # the full version 1 is intact beside it


def test_accounting_counts_bytes_exactly(tmp_path):
    x, y, z = expert(0, width=17), expert(1, width=40), expert(2, width=9)
    nx, ny, nz = nbytes(x), nbytes(y), nbytes(z)
    big = size_of(y)
    st = ExpertStore(tmp_path, ram_bytes=size_of(y) + size_of(z) + 1, gpu_bytes=big)
    for n, t in (("x", x), ("y", y), ("z", z)):
        st.put(n, t)
    st.flush()
    s = st.summary()
    assert s["bytes_to_ram"] == s["bytes_snapshot"] == nx + ny + nz
    assert s["bytes_to_disk"] == nx + ny + nz      # x on eviction, y and z by flush()
    assert s["bytes_from_disk"] == 0 and s["bytes_to_dev"] == 0
    assert_same(st.get("y")[0], y)                 # from RAM
    assert_same(st.get("y")[0], y)                 # already on the device
    assert_same(st.get("x")[0], x)                 # from disk
    s = st.summary()
    assert s["bytes_from_disk"] == nx
    assert s["bytes_to_dev"] == nx + ny
    assert s["hits"] == {"dev": 1, "ram": 1, "disk": 1} and s["misses"] == {"dev": 2, "ram": 1}
    assert s["wait_s"] == pytest.approx(s["get_s"] + s["put_s"])
    st.close()


def _versions(root, name):
    return [r["version"] for r in json.loads((root / name / "manifest.json").read_text())["versions"]]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_file_is_reported_and_previous_version_used(tmp_path, damage):
    v1, v2 = expert(1), expert(2)
    with ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20) as st:
        st.put("e", v1, meta={"v": 1}, durable=True)
        st.flush()
        st.put("e", v2, meta={"v": 2}, durable=True)
    newest = tmp_path / "e" / "v000002.safetensors"
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
    else:
        data = data[: len(data) // 2]
    newest.write_bytes(bytes(data))
    st = ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20)
    problems = st.verify()
    assert len(problems) == 1 and "v000002.safetensors" in problems[0]
    assert ("checksum" if damage == "flip" else "truncated") in problems[0]
    with pytest.warns(CorruptExpertWarning, match="v000002.safetensors"):
        got, meta = st.get("e")
    assert_same(got, v1) and meta == {"v": 1}
    assert st.stats.corrupt == [str(newest)]
    # the next save keeps the good v1 and sets the damaged file aside
    st.put("e", expert(3), meta={"v": 3})
    st.flush()
    assert _versions(tmp_path, "e") == [3, 1]
    assert (tmp_path / "e" / "v000002.safetensors.corrupt").is_file()
    st.close()


def test_no_good_copy_is_a_clear_error(tmp_path):
    with ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20) as st:
        st.put("e", expert(1), durable=True)
    (tmp_path / "e" / "v000001.safetensors").write_bytes(b"\0" * 20)
    st = ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20)
    with pytest.raises(StoreError, match=r"'e': no good copy on disk: .*v000001.safetensors"):
        st.get("e")
    (tmp_path / "e" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json: unreadable store manifest"):
        st.get("e")
    st.close()


def test_older_version_with_another_layout_is_used(tmp_path):
    full = expert(1)
    with ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20) as st:
        st.put("e", full, durable=True)
        st.flush()
        st.put("e", expert(2), dtype=torch.bfloat16, keep_optimizer=False, durable=True)
    path = tmp_path / "e" / "v000002.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    st = ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20)
    st.prefetch("e")
    with pytest.warns(CorruptExpertWarning, match="v000002"):
        got, _ = st.get("e")
    assert_same(got, full)
    st.close()


def test_save_failing_midway_keeps_previous_copy(tmp_path, monkeypatch):
    v1, v2 = expert(1), expert(2)
    st = ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20)
    st.put("e", v1, durable=True)
    st.flush()
    real = files_mod._write_span

    def disk_full(f, mv, crc):
        f.write(mv[: len(mv) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files_mod, "_write_span", disk_full)
    st.put("e", v2)
    with pytest.raises(StoreError, match="writing expert 'e'.*No space left"):
        st.flush()
    assert _versions(tmp_path, "e") == [1]
    assert not list((tmp_path / "e").glob(".*.tmp"))     # the half-written file was removed
    with ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20) as other:
        assert_same(other.get("e")[0], v1)                # on disk: the previous good copy
    assert_same(st.get("e")[0], v2)                       # in RAM: the new one, still to be saved
    monkeypatch.setattr(files_mod, "_write_span", real)
    st.flush()
    assert _versions(tmp_path, "e") == [3, 1]             # version 2 was never completed
    st.close()


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    import gmlib.expert_files as F, gmlib.store as S
    def ex(seed):
        g = torch.Generator().manual_seed(seed)
        return {"model.w": torch.randn(256, 256, generator=g), "model.b": torch.randn(256, generator=g).bfloat16()}
    st = S.ExpertStore(sys.argv[1], 1 << 24, 1 << 24)
    st.put("e", ex(1), durable=True)
    st.flush()
    real = F._write_span
    def slow(f, mv, crc):
        f.write(mv[: len(mv) // 2]); f.flush()
        print("mid-write", flush=True)
        time.sleep(120)
    F._write_span = slow
    st.put("e", ex(2), durable=True)
    st.flush()
""")


def test_save_killed_midway_keeps_previous_copy(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "mid-write", proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert list((tmp_path / "e").glob(".v000002.safetensors.*.tmp"))   # the half-written file is there
    assert _versions(tmp_path, "e") == [1]
    g = torch.Generator().manual_seed(1)
    v1 = {"model.w": torch.randn(256, 256, generator=g), "model.b": torch.randn(256, generator=g).bfloat16()}
    st = ExpertStore(tmp_path, ram_bytes=1 << 24, gpu_bytes=1 << 24)
    assert_same(st.get("e")[0], v1)
    assert st.verify() == []
    st.put("e", expert(3), durable=True)
    st.flush()
    assert _versions(tmp_path, "e") == [2, 1]
    assert not list((tmp_path / "e").glob(".*.tmp"))                   # cleaned by the next save
    st.close()


def test_prefetch_then_get_returns_the_right_expert(tmp_path):
    refs = {n: expert(i) for i, n in enumerate("abc")}
    one = size_of(refs["a"])
    with ExpertStore(tmp_path, ram_bytes=3 * one, gpu_bytes=3 * one) as st:
        for n, t in refs.items():
            st.put(n, t)
    st = ExpertStore(tmp_path, ram_bytes=3 * one, gpu_bytes=2 * one)
    st.prefetch("c")                                   # from disk, in the background
    st.prefetch("a")
    assert_same(st.get("a")[0], refs["a"])
    assert_same(st.get("c")[0], refs["c"])
    st.prefetch("b")                                   # evicts a from the device, not c (held)
    assert_same(st.get("b")[0], refs["b"])
    assert st.stats.hits == {"dev": 3, "ram": 0, "disk": 0} and st.stats.prefetches == 3
    st.evict("c")
    st.prefetch("c")                                   # from disk again
    assert_same(st.get("c")[0], refs["c"])
    assert st.stats.bytes_from_disk == 4 * nbytes(refs["a"])
    with pytest.raises(StoreError, match="no expert named 'zz'"):
        st.prefetch("zz")
    st.close()


def test_bf16_weights_only_policy(tmp_path):
    ref = expert(5)
    with ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20) as st:
        st.put("e", ref, dtype=torch.bfloat16, keep_optimizer=False)
        st.put("f", ref, dtype=torch.bfloat16)          # optimizer kept, and kept in full precision
    expect = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
              for k, v in ref.items() if k.startswith("model.")}
    st = ExpertStore(tmp_path, ram_bytes=1 << 20, gpu_bytes=1 << 20)
    got, _ = st.get("e")
    assert_same(got, expect)
    got, _ = st.get("f")
    assert_same({k: v for k, v in got.items() if k.startswith("model.")}, expect)
    assert_same({k: v for k, v in got.items() if k.startswith("optim.")},
                {k: v for k, v in ref.items() if k.startswith("optim.")})
    st.close()
    size = (tmp_path / "e" / "v000001.safetensors").stat().st_size
    assert 0 < size - nbytes(expect) < 2048             # the file is the bf16 weights plus a small header


def test_bad_input_is_a_clear_error(tmp_path):
    st = ExpertStore(tmp_path, ram_bytes=1 << 12, gpu_bytes=1 << 12)
    with pytest.raises(StoreError, match="bad expert name"):
        st.put("../x", {"a": torch.zeros(1)})
    with pytest.raises(StoreError, match="meta must be JSON"):
        st.put("x", {"a": torch.zeros(1)}, meta={"f": object()})
    with pytest.raises(StoreError, match="ram tier's budget of 4096 bytes cannot hold"):
        st.put("x", {"a": torch.zeros(2048)})
    with pytest.raises(StoreError, match="no expert named 'nope'"):
        st.get("nope")
    st.close()


def test_random_operations_match_a_plain_dict(tmp_path):
    """Random puts (two sizes, both policies), gets, prefetches, evictions, flushes and reopens
    under tight budgets: get() always returns the newest put, as a dict would."""
    import random
    rng = random.Random(0)
    names = [f"x{i}" for i in range(6)]
    budget = 3 * size_of(expert(0, width=40))
    newest, version = {}, 0
    st = ExpertStore(tmp_path, ram_bytes=budget, gpu_bytes=budget // 2)
    for _ in range(300):
        op, name = rng.random(), rng.choice(names)
        if op < 0.35:
            version += 1
            t = expert(version, width=rng.choice([17, 40]))
            if rng.random() < 0.3:
                st.put(name, t, meta={"v": version}, dtype=torch.bfloat16, keep_optimizer=False)
                t = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in t.items() if k.startswith("model.")}
            else:
                st.put(name, t, meta={"v": version}, durable=rng.random() < 0.2)
            newest[name] = (t, version)
        elif op < 0.7 and name in newest:
            got, meta = st.get(name)
            assert_same(got, newest[name][0])
            assert meta == {"v": newest[name][1]}
        elif op < 0.85 and name in newest:
            st.prefetch(name)
        elif op < 0.92:
            st.evict(name)
        elif op < 0.96:
            st.flush()
        else:
            st.close()
            st = ExpertStore(tmp_path, ram_bytes=budget, gpu_bytes=budget // 2)
        assert st.used_bytes("ram") <= budget and st.used_bytes("dev") <= budget // 2
    st.close()
    st = ExpertStore(tmp_path, ram_bytes=budget, gpu_bytes=budget // 2)
    assert st.names() == sorted(newest)
    for name, (t, v) in newest.items():
        assert_same(st.read(name)[0], t)
    assert st.verify() == []
    st.close()
