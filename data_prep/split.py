"""Deterministic train/val/test split and per-source mixing weights, both by a hash of the text.

A document's split depends only on its text (BLAKE2b, not Python's salted `hash`), so it is
identical across runs, machines and orderings, and two identical texts can never straddle
the split. Mixing uses a second, independent hash so that which documents a down-weighted
source keeps is not correlated with the split.
"""
import hashlib

SPLITS = ("train", "val", "test")


def text_hash(text: str, salt: bytes = b"") -> float:
    """A uniform number in [0, 1) from the text's UTF-8 bytes."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=salt).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_of(text: str, val_frac: float = 0.01, test_frac: float = 0.01) -> str:
    """'test' for the first `test_frac` of hash space, 'val' for the next `val_frac`, else 'train'."""
    if not (0 <= val_frac and 0 <= test_frac and val_frac + test_frac < 1):
        raise ValueError(f"bad split fractions val={val_frac} test={test_frac}")
    u = text_hash(text)
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def copies(text: str, weight: float) -> int:
    """How many times a training document enters the mix under a source weight: the integer
    part always, plus one more with probability equal to the fractional part (decided by the
    hash, so the same documents are chosen every run). weight 0.3 keeps ~30%, 2.5 gives 2 or 3."""
    if weight < 0:
        raise ValueError(f"negative source weight {weight}")
    whole = int(weight)
    return whole + (1 if text_hash(text, b"mix") < weight - whole else 0)
