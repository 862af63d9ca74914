"""Few-shot fine-tuning on the real Wildberries reviews: the held-out split and nested subsets are
fixed and reproducible, a bad review file is a clear error, fine-tuning lowers the held-out
review loss of a dense model and of gm, and gm's pre-trained expert files stay byte-identical."""
import gzip
import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmlib import finetune as ft
from gmlib import shop_reviews
from gmlib import gm as gmmod
from gmlib import serve
from gmlib.lm import SingleLM
from gmlib.paths import data_dir
from gmlib.store import ExpertStore
from gmlib.train import TrainConfig, setup

TINY = {"seq_len": 64, "n_layer": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reviews_path():
    root = data_dir()
    path = None if root is None else root / "reviews" / "reviews_wildberries.jsonl.gz"
    if path is None or not path.is_file():
        pytest.skip("no shared reviews file (GM_DATA_DIR/reviews/reviews_wildberries.jsonl.gz)")
    return path


@pytest.fixture(scope="module")
def reviews(reviews_path):
    return shop_reviews.load_reviews(reviews_path)


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_path):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))


def test_load_and_format_reviews(reviews, reviews_path):
    with gzip.open(reviews_path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(reviews) == sum(bool(r["text"].strip()) for r in raw)  # only rating-only reviews are dropped
    first = next(r for r in raw if r["text"].strip())
    doc = shop_reviews.format_review(reviews[0])
    assert doc == f"Оценка: {first['rating']} из 5\nТовар: {first['product_name']}\n{first['text']}"
    assert doc.startswith(shop_reviews.review_prompt(first["rating"], first["product_name"]))
    assert shop_reviews.format_review({"rating": None, "product": "", "text": "Хорошо"}) == "Хорошо"


def test_bad_review_file_is_a_clear_error(tmp_path, reviews_path):
    with gzip.open(reviews_path, "rt", encoding="utf-8") as f:
        good = [next(f) for _ in range(3)]
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        shop_reviews.load_reviews(tmp_path / "nothere.jsonl")
    cases = {"badjson.jsonl": (good + ["{not json\n"], r"badjson\.jsonl:4: not valid JSON"),
             "notext.jsonl": (good[:2] + [json.dumps({"id": "x", "rating": 5}) + "\n"],
                              r"notext\.jsonl:3: no \"text\""),
             "empty.jsonl": ([json.dumps({"text": "  "}) + "\n"], r"empty\.jsonl: no review with text")}
    for name, (lines, msg) in cases.items():
        (tmp_path / name).write_text("".join(lines), encoding="utf-8")
        with pytest.raises(ValueError, match=msg):
            shop_reviews.load_reviews(tmp_path / name)
    (tmp_path / "cut.jsonl.gz").write_bytes(reviews_path.read_bytes()[:5000])  # a truncated download
    (tmp_path / "plain.jsonl.gz").write_text("".join(good), encoding="utf-8")   # not gzip at all
    for name in ("cut.jsonl.gz", "plain.jsonl.gz"):
        with pytest.raises(ValueError, match=rf"{name}: unreadable reviews file"):
            shop_reviews.load_reviews(tmp_path / name)


def test_heldout_split_and_nested_subsets(reviews):
    pool, held = shop_reviews.split_heldout(reviews, 0.1)
    assert (pool, held) == shop_reviews.split_heldout(list(reviews), 0.1)          # deterministic
    assert 0.08 < len(held) / len(reviews) < 0.12
    assert not {r["text"] for r in pool} & {r["text"] for r in held}     # duplicates never straddle
    assert shop_reviews.split_heldout(reviews, 0.1, max_heldout=50)[1] == held[:50]  # a fixed subsample
    sizes = [25, 50, 100, 200, 400, "all"]
    a, b, c = (shop_reviews.nested_subsets(pool, sizes, s) for s in (0, 0, 1))
    nbytes = np.array([len(shop_reviews.format_review(r).encode()) for r in pool])
    for s in sizes:
        assert all(np.array_equal(x, y) for x, y in zip(a[s], b[s]))    # same seed, same subsets
        tr, va = a[s]
        idx = np.concatenate([tr, va])
        assert len(set(idx)) == len(idx) and 0.08 < len(va) / len(idx) < 0.12
        total = nbytes[idx].sum()
        if s == "all":
            assert len(idx) == len(pool)
        else:  # the shortest prefix of the seeded order reaching s KB: at most one review over
            assert s * shop_reviews.KB <= total < s * shop_reviews.KB + nbytes.max()
    for small, big in zip(sizes, sizes[1:]):
        for x, y in zip(a[small], a[big]):
            assert set(x) <= set(y)                                     # nested, train and val slices alike
    assert set(np.concatenate(a[25])) != set(np.concatenate(c[25]))      # another seed, another subset
    with pytest.raises(ValueError, match="KB"):
        shop_reviews.nested_subsets(pool, [10 ** 6], 0)


def test_slice_bpb_matches_a_direct_forward_pass(reviews, sp):
    """The bits per byte that choose lr and step, against cross-entropy computed from the logits."""
    torch.manual_seed(0)
    from gmlib.model import GPT, make_config
    model = GPT(make_config("tiny", vocab_size=sp.get_piece_size(), seq_len=512)).eval()
    docs = shop_reviews.encode(reviews[:20], sp)
    assert all(len(d.tokens) <= 512 for d in docs)
    with torch.no_grad():
        nats = sum(F.cross_entropy(model(torch.as_tensor(d.tokens[None, :-1]))[0][0], torch.as_tensor(d.tokens[1:]),
                                   reduction="sum").item() for d in docs)
    ref = nats / math.log(2) / sum(len(shop_reviews.format_review(r).encode()) for r in reviews[:20])
    assert ft.slice_bpb(SingleLM(model), docs) == pytest.approx(ref, rel=1e-6)


def test_text_bpb_scores_the_review_text_given_its_header(reviews, sp):
    """text_bpb: the review text's tokens (after [bos] and the header) against its own UTF-8 bytes, from the
    same log-probs as the whole-document bpb; a reference from the logits."""
    torch.manual_seed(0)
    from gmlib.model import GPT, make_config
    model = GPT(make_config("tiny", vocab_size=sp.get_piece_size(), seq_len=512)).eval()
    docs = shop_reviews.encode(reviews[:20], sp)
    heads = sp.encode([shop_reviews.review_prompt(r["rating"], r["product"]) for r in reviews[:20]])
    assert [d.n_head for d in docs] == [1 + len(h) for h in heads]
    assert [d.text_bytes for d in docs] == [len(r["text"].encode()) for r in reviews[:20]]
    with torch.no_grad():
        nats = sum(F.cross_entropy(model(torch.as_tensor(d.tokens[None, :-1]))[0][0][d.n_head - 1:],
                                   torch.as_tensor(d.tokens[d.n_head:]), reduction="sum").item() for d in docs)
    ref = nats / math.log(2) / sum(d.text_bytes for d in docs)
    assert math.isfinite(ref) and shop_reviews.heldout_scores(SingleLM(model), docs, n_boot=10)["text_bpb"] == \
        pytest.approx(ref, rel=1e-6)


def file_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pretrained(tiny_shards, tmp_path_factory):
    """A dense tiny model and a 2-expert gm, each briefly pre-trained on the corpus shards."""
    tcfg = TrainConfig(max_steps=30, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_every=0, log_every=10,
                       device="cpu")
    from gmlib.model import make_config
    tr = setup(make_config("tiny", vocab_size=1000, **TINY), tcfg, tiny_shards)
    tr.run(progress=False)
    out = tmp_path_factory.mktemp("gm")
    gmmod.train_gm(gmmod.GMConfig.from_dict(dict(
        n_experts=2, router="local", router_cfg={"n_features": 4096, "n_units": 4096, "wta_k": 32, "epochs": 2},
        model=TINY, budget="fixed", tokens=30 * 8 * 64, segment_steps=30, device="cpu",
        batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_every=0, log_every=10)), tiny_shards, out)
    return tr.model.eval(), out


def test_finetuning_lowers_heldout_loss_and_keeps_pretrained_experts(pretrained, reviews, sp):
    dense, out = pretrained
    pool, held = shop_reviews.split_heldout(reviews, 0.1, max_heldout=60)
    before = file_hashes(out)
    gm = serve.load_gm(out)
    cfg = ft.FinetuneConfig(steps=20, lrs=(3e-3, 1e-2), batch_size=8, seq_len=64, eval_every=10, warmup_steps=3)
    points, curve, final = ft.learning_curve(dense, gm, pool, held, sp, cfg, [3, 6], [0], curve_kb=6, n_boot=100,
                                             save="all", log=lambda *a: None)
    gm.close()

    for model in ("dense", "gm"):
        p = points[points.model == model].set_index("subset_kb")
        assert p.loc[0, "steps"] == 0
        assert p.loc[6, "val_bpb"] < p.loc[0, "val_bpb"] - 0.05, p      # fine-tuning helped on held-out reviews
        assert p.loc[6, "val_ppl"] < p.loc[0, "val_ppl"]
        c = curve[curve.model == model]
        assert list(c.step) == [0, 10, 20] and c.lr.nunique() == 1
    c, p = curve[curve.model == "dense"], points[points.model == "dense"].set_index("subset_kb")
    assert c.val_bpb.iloc[0] == pytest.approx(p.loc[0, "val_bpb"], rel=1e-12)  # step 0 is the pre-trained model
    assert set(points.columns) >= {"model", "subset_kb", "seed", "steps", "val_ppl", "val_bpb"}
    assert set(final) == {"dense", "gm"}

    # pre-trained files untouched, byte for byte; the fine-tuned experts are new entries beside them
    after = file_hashes(out)
    assert {k: v for k, v in after.items() if k in before} == before
    saved = [n for s in points.saved_as.dropna() for n in s.split(",")]
    assert len(saved) == 2 and all(".ft-reviews-" in n for n in saved)
    with ExpertStore(out / "store", 1 << 30, 1 << 30) as st:
        assert set(st.names()) == {"expert_000", "expert_001", *saved}
        base = st.read(saved[-1].split(".ft-")[0])[0]
        new, meta = st.read(saved[-1])
        assert meta["base"] == saved[-1].split(".ft-")[0] and meta["subset_kb"] == 6
        assert not any(k.startswith("optim.") for k in new)
        assert any(not torch.equal(new[k], base[k]) for k in new)
    # the record is what load_gm still serves: gm.json lists only the pre-trained experts
    assert json.loads((out / "gm.json").read_text())["experts"] == ["expert_000", "expert_001"]

