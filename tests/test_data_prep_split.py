"""Split and mixing: pinned to an independent computation of the hash, so the split of any
document is the same on every machine and in every run."""
import hashlib

import numpy as np
import pytest

from data_prep.split import copies, split_of, text_hash


def test_text_hash_is_blake2b_of_utf8():
    t = "Пример документа"
    ref = int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    assert text_hash(t) == ref
    # pinned values: a change here moves documents between splits (and breaks every comparison)
    assert round(text_hash(""), 12) == \
        round(int.from_bytes(hashlib.blake2b(b"", digest_size=8).digest(), "big") / 2**64, 12)
    assert split_of(t, 0.01, 0.01) == ("test" if ref < 0.01 else "val" if ref < 0.02 else "train")


def test_fractions_and_independence_of_order():
    texts = [f"документ номер {i}" for i in range(20000)]
    s = [split_of(t, 0.1, 0.05) for t in texts]
    frac = {k: s.count(k) / len(s) for k in ("train", "val", "test")}
    assert abs(frac["val"] - 0.1) < 0.01 and abs(frac["test"] - 0.05) < 0.01
    assert [split_of(t, 0.1, 0.05) for t in reversed(texts)] == s[::-1]


def test_bad_fractions():
    with pytest.raises(ValueError):
        split_of("x", 0.6, 0.5)
    with pytest.raises(ValueError):
        split_of("x", -0.1, 0.1)


def test_copies_follow_the_weight():
    texts = [f"текст {i}" for i in range(20000)]
    for w in (0.0, 0.3, 1.0, 2.5):
        c = np.array([copies(t, w) for t in texts])
        assert set(c.tolist()) <= {int(w), int(w) + 1}
        assert abs(c.mean() - w) < 0.02
    assert [copies(t, 0.3) for t in texts[:100]] == [copies(t, 0.3) for t in texts[:100]]
    with pytest.raises(ValueError):
        copies("x", -1)
