"""Evaluation against hand computations: bits per byte, intervals, PARus scoring, file errors."""
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlib import eval_docs, generation, registry, zeroshot
from gmlib import evaluate as ev
from gmlib.checkpoint import save_checkpoint
from gmlib.data import ShardWriter
from gmlib.lm import SingleLM
from gmlib.model import GPT, GPTConfig
from pipeline import records

TEXTS = ["Мама мыла раму.", "Кот спит на окне, а пёс во дворе.", "Ёж", "Дождь идёт весь день и всю ночь."]


class CharTokenizer:
    """One token per character; 0 = unk, 1 = bos. decode(encode(t)) == t."""

    def __init__(self, texts):
        self.chars = ["<unk>", "<s>"] + sorted(set("".join(texts)) | set(" .,:«»\n0123456789?"))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        return [self.ids.get(c, 0) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def bos_id(self):
        return 1

    def vocab_size(self):
        return len(self.chars)


class UnigramLM:
    """A rigged model: p(x_t | x_<t) = table[x_t] whatever the context."""

    def __init__(self, logp):
        self.logp = np.asarray(logp, np.float64)
        self.params_total = self.params_active = 0

    def token_logprobs_many(self, docs, known=None):
        return [self.logp[np.asarray(d)[1:]] for d in docs]


def uniform_gpt(V, seq_len=32):
    """All weights zero: every logit is 0, so p = 1/V at every position."""
    m = GPT(GPTConfig(vocab_size=V, seq_len=seq_len, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m.eval()


def write_jsonl(path, records, raw_lines=()):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "".join(raw_lines),
                    encoding="utf-8")
    return path


def test_bpb_of_a_uniform_model_matches_the_hand_computation(tmp_path):
    tok = CharTokenizer(TEXTS)
    V = tok.vocab_size()
    docs = eval_docs.docs_from_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS]), tok)
    q = ev.quality(SingleLM(uniform_gpt(V)), docs, n_boot=200)
    n_tok = sum(len(t) for t in TEXTS)                      # every character; the bos is not scored
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)    # Cyrillic letters are 2 bytes each
    n_words = sum(len(t.split()) for t in TEXTS)
    assert q["n_tokens"] == n_tok and q["n_bytes"] == n_bytes and q["n_words"] == n_words
    assert q["bpb"] == pytest.approx(n_tok * math.log2(V) / n_bytes, rel=1e-6)
    assert q["ppl_token"] == pytest.approx(V, rel=1e-6)
    assert q["ppl_word"] == pytest.approx(math.exp(n_tok * math.log(V) / n_words), rel=1e-6)
    assert q["bpb_lo"] <= q["bpb"] <= q["bpb_hi"] and q["bpb_lo"] < q["bpb_hi"]
    assert q["ppl_token_lo"] == pytest.approx(V, rel=1e-6) == q["ppl_token_hi"]  # every resample: V


def test_bpb_of_a_rigged_model_and_degenerate_interval(tmp_path):
    tok = CharTokenizer(TEXTS)
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(tok.vocab_size())))
    docs = eval_docs.docs_from_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"text": TEXTS[1]}] * 3), tok)
    q = ev.quality(UnigramLM(logp), docs, n_boot=100)
    bits = -sum(logp[tok.ids[c]] for c in TEXTS[1]) / math.log(2)
    assert q["bpb"] == pytest.approx(bits / len(TEXTS[1].encode("utf-8")), rel=1e-12)
    # three identical documents: every bootstrap resample gives the same value
    assert q["bpb_lo"] == pytest.approx(q["bpb"], rel=1e-12) == q["bpb_hi"]


def test_docs_from_shards_and_from_jsonl(tmp_path):
    tok = CharTokenizer(TEXTS)
    with ShardWriter(tmp_path / "test", tok.vocab_size(), ["s"], shard_tokens=20) as w:
        for t in TEXTS * 5:
            w.add([1] + tok.encode(t), 0, len(t.encode("utf-8")))
    docs = eval_docs.docs_from_shards(tmp_path / "test", tok)
    assert len(docs) == 20
    assert [d.nbytes for d in docs[:4]] == [len(t.encode("utf-8")) for t in TEXTS]
    assert [d.nwords for d in docs[:4]] == [3, 8, 1, 7]
    picked = eval_docs.docs_from_shards(tmp_path / "test", tok, max_docs=4)  # evenly spaced: 0, 6, 13, 19
    assert [tok.decode(d.tokens[1:].tolist()) for d in picked] == [TEXTS[0], TEXTS[2], TEXTS[1], TEXTS[3]]

    # a gzipped corpus file with a cleaner that drops one record and edits another
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"id": i, "source": "x", "text": "  " + t}, ensure_ascii=False) + "\n")
    def clean(rec):
        return None if rec["id"] == 2 else rec["text"].strip()

    docs = eval_docs.docs_from_jsonl(path, tok, clean_fn=clean)
    assert [tok.decode(d.tokens[1:].tolist()) for d in docs] == [TEXTS[0], TEXTS[1], TEXTS[3]]
    assert all(d.tokens[0] == 1 for d in docs)
    assert len(eval_docs.docs_from_jsonl(path, tok, clean_fn=clean, max_docs=2)) == 2


def test_bad_corpus_file_names_file_and_line(tmp_path):
    tok = CharTokenizer(TEXTS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "Привет мир"}], ["{not json\n"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        eval_docs.docs_from_jsonl(bad, tok)
    bad = write_jsonl(tmp_path / "notext.jsonl", [{"text": "Привет"}, {"body": "x"}])
    with pytest.raises(ValueError, match=r"notext\.jsonl:2: no \"text\""):
        eval_docs.docs_from_jsonl(bad, tok)


PARUS = [
    {"idx": 0, "premise": "Мама мыла раму.", "choice1": "Рама была грязной.", "choice2": "Кот спал.",
     "question": "cause", "label": 0},
    {"idx": 1, "premise": "Дождь идёт.", "choice1": "Кот спит.", "choice2": "Улицы мокрые.",
     "question": "effect", "label": 1},
]


def test_parus_prompts():
    ctx, conts = zeroshot.parus_texts(PARUS[0], "connector")
    assert ctx + conts[0] == "Мама мыла раму потому что рама была грязной."
    ctx, conts = zeroshot.parus_texts(PARUS[1], "connector")
    assert ctx + conts[1] == "Дождь идёт, поэтому улицы мокрые."
    ctx, conts = zeroshot.parus_texts(PARUS[1], "mera")
    assert "«Дождь идёт.»" in ctx and "следствием" in ctx and ctx.endswith("Ответ:") and \
        conts == [" Кот спит.", " Улицы мокрые."]


def test_parus_picks_the_more_likely_alternative(tmp_path):
    path = write_jsonl(tmp_path / "parus.jsonl", PARUS)
    items = zeroshot.load_parus(path)
    tok = CharTokenizer(TEXTS + [json.dumps(PARUS, ensure_ascii=False)])
    # rigged: the characters of the right alternatives are likely, every other one is not
    logp = np.full(tok.vocab_size(), -6.0)
    for c in set("Рама была грязной. Улицы мокрые.".lower() + "РУ"):
        logp[tok.ids[c]] = -0.1
    for style in zeroshot.STYLES:
        df = zeroshot.score_parus(UnigramLM(logp), items, tok, style)
        assert df["pred"].tolist() == [0, 1] and df["correct"].tolist() == [1, 1]
        # the scored part is the continuation only: hand computation of item 0, alternative 1
        cont = zeroshot.parus_texts(items[0], style)[1][0]
        assert df["ll1"][0] == pytest.approx(sum(logp[tok.ids[c]] for c in cont))
        assert df["ntok1"][0] == len(cont)
        s = zeroshot.parus_summary(df)
        assert s["acc"] == 1.0 and s["n"] == 2 and s["ci"][1] == pytest.approx(1.0)
    # a model that prefers "Кот" picks the wrong alternative in both items
    logp = np.full(tok.vocab_size(), -6.0)
    for c in set("котспалК"):
        logp[tok.ids[c]] = -0.5
    df = zeroshot.score_parus(UnigramLM(logp), items, tok, "connector")
    assert df["pred"].tolist() == [1, 0] and zeroshot.parus_summary(df)["acc"] == 0.0


def test_malformed_parus_file_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "p.jsonl", [PARUS[0], {**PARUS[1], "question": "why"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: question must be"):
        zeroshot.load_parus(bad)
    bad = write_jsonl(tmp_path / "q.jsonl", [PARUS[0], {k: v for k, v in PARUS[1].items() if k != "choice2"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: PARus record lacks \['choice2'\]"):
        zeroshot.load_parus(bad)
    bad = write_jsonl(tmp_path / "r.jsonl", [PARUS[0]], ['{"idx": 1, "premise": \n'])
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not valid JSON"):
        zeroshot.load_parus(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        zeroshot.load_parus(tmp_path / "nope.jsonl")


def test_wilson_interval_textbook_values():
    lo, hi = zeroshot.wilson(7, 10)  # Wilson (1927) / Newcombe (1998): 0.3968 to 0.8922
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    assert zeroshot.wilson(0, 10)[0] == 0.0 and zeroshot.wilson(10, 10)[1] == pytest.approx(1.0)


def test_encode_continuation_falls_back_when_tokens_merge():
    class Merging(CharTokenizer):  # merges "a b" into one token: no boundary at the context's end
        def encode(self, text):
            return [99 if text[i:i + 3] == "a b" else self.ids.get(c, 0)
                    for i, c in enumerate(text)][:len(text) - 2 * text.count("a b")]
    tok = Merging(["a b"])
    ctx, cont = zeroshot.encode_continuation(tok, "a", " b")
    assert ctx == tok.encode("a") and cont == tok.encode(" b")
    tok = CharTokenizer(["аб в"])
    assert zeroshot.encode_continuation(tok, "аб", " в") == (tok.encode("аб"), tok.encode(" в"))


def test_prompts_are_the_articles():
    article = Path(__file__).resolve().parents[2] / "shared" / "seed" / "article-ru.txt"
    if not article.is_file():
        pytest.skip("the article is not beside the repository")
    lines = [ln for ln in article.read_text(encoding="utf-8").splitlines() if ln.startswith("Контекст:")]
    assert any(generation.PROMPT_METHANOL in ln and "метанол" in ln for ln in lines)
    assert any(generation.PROMPT_SWEETS in ln and ln.rstrip("*").endswith("сладостями") for ln in lines)


def test_load_models_and_one_path_for_all(tmp_path):
    tok = CharTokenizer(TEXTS)
    torch.manual_seed(0)
    paths = []
    for i in range(2):
        m = GPT(GPTConfig(vocab_size=tok.vocab_size(), seq_len=16, n_layer=1, n_head=2, n_embd=16))
        paths.append(save_checkpoint(tmp_path / f"m{i}" / "checkpoint.safetensors", m,
                                     meta={"accounting": {"gpu_seconds": 10.0 + i}}))
    models = registry.load_models([{"name": "d0", "path": paths[0]}, {"name": "d1", "kind": "dense", "path": paths[1]},
                             {"name": "mix-k1", "kind": "mixture", "experts": paths, "k": 1, "base_prior": [0.9, 0.1]},
                             {"name": "mix-k2", "kind": "mixture", "experts": paths, "k": 2}])
    assert models["d1"].train_gpu_seconds == 11.0 and models["mix-k2"].train_gpu_seconds == 21.0
    assert models["mix-k2"].params_total == 2 * models["d0"].params_total == models["mix-k2"].params_active
    assert models["mix-k1"].params_active == models["d0"].params_total
    # > seq_len
    docs = eval_docs.docs_from_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"text": t * 2} for t in TEXTS]), tok)
    df = ev.quality_table(models, docs, n_boot=50)
    assert df["bpb"][0] == pytest.approx(df["bpb"][2], rel=1e-12)  # k=1 on expert 0 is expert 0
    # paired differences against the first model: zero for itself, the bpb gap for the others
    assert df["bpb_delta"][0] == 0 == df["bpb_delta_lo"][0] == df["bpb_delta_hi"][0]
    assert df["bpb_delta"][1] == pytest.approx(df["bpb"][1] - df["bpb"][0], rel=1e-9)
    assert df["bpb_delta_lo"][1] <= df["bpb_delta"][1] <= df["bpb_delta_hi"][1]
    rec = records.metrics_record(df, {"d0": {"connector": zeroshot.parus_summary(
        zeroshot.score_parus(models["d0"], PARUS, tok, "connector"))}})
    assert set(rec["models"]) == set(models) and rec["models"]["d0"]["train_gpu_seconds"] == 10.0
    assert rec["models"]["mix-k2"]["bpb_ci"][0] <= rec["models"]["mix-k2"]["bpb"]
    assert rec["parus"]["d0"]["connector"]["n"] == 2
    with pytest.raises(ValueError, match="unknown kind 'gm'"):
        registry.load_models([{"name": "g", "kind": "gm"}])

    texts = generation.generate_texts(models, tok, prompts={"p": "Мама"}, max_new_tokens=5, seed=3)
    assert texts == generation.generate_texts(models, tok, prompts={"p": "Мама"}, max_new_tokens=5, seed=3)
    md = generation.generations_markdown(texts, {"p": "Мама"}, {"seed": 3})
    assert "**Контекст:** Мама" in md and all(f"**{n}:**" in md for n in models)
    fig = ev.quality_figure(df)
    assert fig.axes[0].get_ylabel().startswith("bits per byte")


def test_real_tokenizer_round_trip_and_parus_boundaries(tiny_tokenizer_path, tiny_shards):
    """With the project's SentencePiece settings the stored byte counts are those of the decoded
    text, and every PARus continuation starts at a token boundary of the joint text."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    docs = eval_docs.docs_from_shards(tiny_shards / "test", sp, max_docs=10)
    assert len(docs) == 10
    for d in docs:
        assert d.nbytes == len(sp.decode(d.tokens[1:].tolist()).encode("utf-8"))
    for item in PARUS:
        for style in zeroshot.STYLES:
            ctx, conts = zeroshot.parus_texts(item, style)
            for c in conts:
                ctx_ids, cont_ids = zeroshot.encode_continuation(sp, ctx, c)
                assert ctx_ids + cont_ids == sp.encode(ctx + c) and ctx_ids == sp.encode(ctx)
