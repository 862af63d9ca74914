"""gm's GPT against an independent implementation: transformers' LlamaForCausalLM loaded from the folder
gmlib.hf exports (logits, KV cache, greedy generation), the round trip back, the tokenizer through
AutoTokenizer against SentencePiece, and a whole gm exported and reloaded."""
import json

import numpy as np
import pytest
import torch

from gmlib import gm, hf, serve
from gmlib.lm import SingleLM
from gmlib.mixture import MixtureConfig
from gmlib.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
TINY = dict(vocab_size=300, seq_len=64, n_layer=2, n_head=4, n_embd=64, activation="swiglu", rope_base=5000.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_gpt(cfg: GPTConfig, seed=0) -> GPT:
    """Random weights, norm gains away from 1 too, so a swapped or dropped tensor would show."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_gpt(GPTConfig(**TINY))
    out = hf.export_gpt(model, tmp_path_factory.mktemp("hf") / "tiny")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    return model, ref, out


def test_logits_match_llama_for_causal_lm(exported):
    model, ref, out = exported
    assert type(ref).__name__ == "LlamaForCausalLM" and ref.dtype == torch.float32
    ids = torch.randint(0, TINY["vocab_size"], (3, TINY["seq_len"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids)[0] - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_kv_cache_and_greedy_generation_match(exported):
    model, ref, _ = exported
    ids = torch.randint(3, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    cache, past = model.new_cache(1), transformers.DynamicCache()
    with torch.no_grad():
        for chunk in (ids[:, :12], ids[:, 12:13], ids[:, 13:]):  # a prompt, then one token, then several
            ours = model(chunk, cache=cache)[0]
            theirs = ref(chunk, past_key_values=past, use_cache=True)
            past = theirs.past_key_values
            assert (ours - theirs.logits).abs().max().item() <= 1e-5
    # gm's cached generation path (gmlib.lm.Stream) against transformers' generate with past_key_values
    prompt = [1] + ids[0, :8].tolist()
    ours = SingleLM(model).generate(prompt, max_new_tokens=24, temperature=0.0, stop_token=2)
    theirs = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=24, use_cache=True)[0, len(prompt):].tolist()
    assert ours == theirs and len(ours) >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_then_export_is_bit_identical(exported, tmp_path, dtype):
    model, _, _ = exported
    first = hf.export_gpt(model, tmp_path / "first", dtype=dtype)
    back = hf.import_gpt(first)
    assert back.cfg == model.cfg and hf.folder_dtype(first) == dtype
    if dtype == torch.float32:
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    second = hf.export_gpt(back, tmp_path / "second", dtype=dtype)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "model.safetensors" in names
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["dtype"] == str(dtype).split(".")[1] and cfg["tie_word_embeddings"] is True
    assert cfg["rope_parameters"]["rope_theta"] == 5000.0 and cfg["intermediate_size"] == 192


def test_what_llama_cannot_hold_is_refused(exported, tmp_path):
    with pytest.raises(ValueError, match="activation='relu2'"):
        hf.export_gpt(GPT(GPTConfig(**{**TINY, "activation": "relu2"})), tmp_path / "relu2")
    assert not (tmp_path / "relu2" / "config.json").exists()
    llama = json.loads((exported[2] / "config.json").read_text())
    for key, value in [("num_key_value_heads", 2), ("hidden_act", "gelu"), ("rms_norm_eps", 1e-5),
                       ("tie_word_embeddings", False), ("attention_bias", True)]:
        with pytest.raises(ValueError, match=key):
            hf.gpt_config({**llama, key: value})
    # a Llama of a width gm would not derive keeps it
    assert hf.gpt_config({**llama, "intermediate_size": 160}).mlp_width == 160


RUSSIAN = ("Мороз и солнце; день чудесный!  Ещё ты дремлешь, друг прелестный —\n\nПора, красавица, проснись: "
           "в 1829 году, 3 ноября, «Зимнее утро» вышло в печать. Ёлка, ёжик, щука; «кавычки» и – тире… "
           "A few Latin words, ☃ и 🙂, табуляция\tи   пробелы.\n")


def test_auto_tokenizer_matches_sentencepiece(real_docs, tiny_tokenizer_path, tmp_path):
    import sentencepiece as spm
    model = random_gpt(GPTConfig(**{**TINY, "vocab_size": 1000}))
    out = hf.export_gpt(model, tmp_path / "tok", tokenizer=tiny_tokenizer_path)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    texts = [RUSSIAN] + [d["text"] for d in real_docs[::40]]
    for text in texts:
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok(text)["input_ids"] == [sp.bos_id()] + ids  # as gm's shards hold a document
        assert tok.decode([sp.bos_id()] + ids, skip_special_tokens=True) == text
    assert any(sp.is_byte(i) for i in sp.encode(RUSSIAN)), "the paragraph should exercise byte fallback"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    with pytest.raises(ValueError, match="vocab_size is 300"):  # a tokenizer of another vocabulary
        hf.export_gpt(random_gpt(GPTConfig(**TINY)), tmp_path / "bad", tokenizer=tiny_tokenizer_path)
    assert not (tmp_path / "bad").exists()


def test_whole_gm_exports_and_scores_identically(tiny_shards, tiny_tokenizer_path, tmp_path):
    from gmlib.data import TokenShards
    cfg = gm.GMConfig.from_dict(dict(n_experts=2, router="random", model={"seq_len": 64, "activation": "swiglu"},
                                     budget="fixed", tokens=6 * 4 * 64, segment_steps=6, device="cpu",
                                     batch_size=4, lr=1e-2, warmup_steps=2, eval_every=0, log_every=5))
    gm.train_gm(cfg, tiny_shards, tmp_path / "gm")
    out = hf.export_gm(tmp_path / "gm", tmp_path / "hf", tokenizer=tiny_tokenizer_path,
                       mixture={"k": 2, "reroute_every": 32}, card="# a tiny gm\n")
    saved = json.loads((out / "gm_hf.json").read_text())
    assert saved["experts"] == ["expert_000", "expert_001"] and saved["mixture"]["k"] == 2
    assert (out / "README.md").read_text() == "# a tiny gm\n"
    assert (out / "expert_001" / "tokenizer.json").is_file() and (out / "router" / "router.json").is_file()
    docs = [TokenShards(tiny_shards / "val").doc(i)[:90] for i in range(4)]
    for spec in [{"k": 2, "reroute_every": 32}, {"k": 1, "pool": "log-linear"}]:
        # the trained gm as 05_evaluate loads it, against the exported folder with the same settings
        before = serve.mixture_loader(tmp_path)({"kind": "gm", "run": "gm", **spec}, "cpu").token_logprobs_many(docs)
        after = hf.mixture_lm(out, **spec).token_logprobs_many(docs)
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert hf.mixture_lm(out).cfg == MixtureConfig(k=2, reroute_every=32)  # the stored settings
    # and each expert folder is an ordinary Llama for transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "expert_000").eval()
    ids = torch.tensor(docs[0][None, :64].astype(np.int64))
    with torch.no_grad():
        assert (hf.import_gpt(out / "expert_000")(ids)[0] - ref(ids).logits).abs().max().item() <= 1e-5


def test_export_script_picks_the_best_exportable_model(tiny_tokenizer_path, tmp_path, monkeypatch):
    import shutil
    import yaml
    from gmlib.checkpoint import save_checkpoint
    from helpers import load_script
    monkeypatch.setenv("GM_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("GM_RESULTS_DIR", str(tmp_path / "results"))
    work, res = tmp_path / "work" / "r", tmp_path / "results" / "r"
    (tmp_path / "work" / "d").mkdir(parents=True)
    shutil.copy(tiny_tokenizer_path, tmp_path / "work" / "d" / "tokenizer.model")
    res.mkdir(parents=True)
    (res / "05_evaluate.params.yaml").write_text(yaml.safe_dump({"data_name": "d", "run_name": "r"}))
    acct = {"tokens": 1234, "gpu_seconds": 5.0, "device": "cpu", "flops": 1e9}
    for name, act in [("relu", "relu2"), ("sw", "swiglu")]:
        save_checkpoint(work / "models" / name / "checkpoint.safetensors",
                        random_gpt(GPTConfig(**{**TINY, "vocab_size": 1000, "activation": act})),
                        meta={"accounting": acct})
    # the ReLU² model scores better but cannot be a Llama: "best" takes the gated one
    summary = {"relu": {"bpb": 1.0, "bpb_ci": [0.9, 1.1], "ppl_word": 50.0},
               "sw": {"bpb": 1.5, "bpb_ci": [1.4, 1.6], "ppl_word": 90.0}}
    (res / "summary.json").write_text(json.dumps({"models": summary}))
    script = load_script("scripts/export_hf.py")
    script.main(["r", "best", str(tmp_path / "out")])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# sw (gm run `r`)" in card and "1.5000 [1.4000, 1.6000]" in card and "1,234 training tokens" in card
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([tok(RUSSIAN)["input_ids"][:60]])
    with torch.no_grad():
        assert (hf.import_gpt(tmp_path / "out")(ids)[0] - ref(ids).logits).abs().max().item() <= 1e-5
    with pytest.raises(SystemExit, match="activation='relu2'"):
        script.main(["r", "relu", str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="neither"):
        script.main(["r", "nosuch", str(tmp_path / "out3")])
