"""gmlib.data: the shard format round-trips, refuses broken folders, and the window sampler is
reproducible and samples real windows of the token stream."""
import json

import numpy as np
import pytest

from gmlib.data import ShardWriter, TokenShards, WindowSampler, is_complete


def _docs(n=50, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 40)) for _ in range(n)]


def test_round_trip_across_several_shards(tmp_path):
    docs = _docs()
    with ShardWriter(tmp_path / "s", vocab_size=300, sources=["a", "b"], shard_tokens=100) as w:
        for i, d in enumerate(docs):
            w.add(d, source=i % 2, nbytes=3 * len(d))
    ts = TokenShards(tmp_path / "s")
    assert len(ts.meta["shards"]) > 3 and is_complete(tmp_path / "s")
    assert ts.n_docs == len(docs) and ts.n_tokens == sum(map(len, docs)) and ts.meta["dtype"] == "uint16"
    for i, d in enumerate(docs):
        assert ts.doc(i).tolist() == d.tolist()
    assert ts.doc_source.tolist() == [i % 2 for i in range(len(docs))]
    assert ts.doc_nbytes.sum() == ts.meta["n_bytes"] == 3 * ts.n_tokens
    assert [x.tolist() for x in ts.iter_docs()] == [d.tolist() for d in docs]


def test_large_vocab_uses_uint32(tmp_path):
    with ShardWriter(tmp_path / "s", vocab_size=70000, sources=["a"]) as w:
        w.add([0, 69999, 65536])
    ts = TokenShards(tmp_path / "s")
    assert ts.meta["dtype"] == "uint32" and ts.doc(0).tolist() == [0, 69999, 65536]


def test_bad_tokens_and_broken_folders(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        with ShardWriter(tmp_path / "bad", vocab_size=10, sources=["a"]) as w:
            w.add([3, 10])
    assert not is_complete(tmp_path / "bad")  # an exception inside `with` leaves no meta.json
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenShards(tmp_path / "bad")
    with ShardWriter(tmp_path / "s", vocab_size=300, sources=["a"]) as w:
        for d in _docs(5):
            w.add(d)
    b = tmp_path / "s" / "shard_00000.bin"
    b.write_bytes(b.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        TokenShards(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    (tmp_path / "s" / "meta.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match="format"):
        TokenShards(tmp_path / "s")


def test_empty_split_is_a_valid_folder(tmp_path):
    with ShardWriter(tmp_path / "e", vocab_size=10, sources=["a"]):
        pass
    ts = TokenShards(tmp_path / "e")
    assert ts.n_docs == 0 and len(ts) == 0


def test_window_sampler_is_reproducible_and_windows_are_real(tiny_shards):
    ts = TokenShards(tiny_shards / "train")
    stream = np.concatenate([np.asarray(t, np.int64) for t in ts.tokens])
    s1, s2 = WindowSampler(ts, 32, 8, seed=1), WindowSampler(ts, 32, 8, seed=1)
    x, y = s1.batch(7)
    x2, y2 = s2.batch(7)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)          # depends only on (seed, step)
    assert not np.array_equal(x, s1.batch(8)[0])
    assert x.shape == y.shape == (8, 32) and np.array_equal(x[:, 1:], y[:, :-1])
    if len(ts.tokens) == 1:  # every window is a contiguous slice of the token stream
        for row, nxt in zip(x, y):
            starts = np.flatnonzero(stream[:len(stream) - 32] == row[0])
            assert any(np.array_equal(stream[s:s + 32], row) and stream[s + 32] == nxt[-1] for s in starts)


def test_window_sampler_refuses_too_few_tokens(tmp_path):
    with ShardWriter(tmp_path / "s", vocab_size=10, sources=["a"]) as w:
        w.add([1, 2, 3])
    with pytest.raises(ValueError, match="too few"):
        WindowSampler(TokenShards(tmp_path / "s"), seq_len=8, batch_size=2)


def test_tiny_shards_fixture_matches_the_tokenizer(real_docs, tiny_tokenizer_path, tiny_shards):
    from data_prep import tokenizer
    sp = tokenizer.load(tiny_tokenizer_path)
    total = 0
    for split in ("train", "val", "test"):
        ts = TokenShards(tiny_shards / split)
        total += ts.n_docs
        assert ts.n_docs > 0 and ts.vocab_size == 1000
        d = ts.doc(0)
        assert d[0] == sp.bos_id()
        assert len(sp.decode(d[1:].tolist()).encode("utf-8")) == ts.doc_nbytes[0]
    assert total == len(real_docs)
