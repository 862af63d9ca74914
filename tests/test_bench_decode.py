"""bench/decode.py's tiny CPU run: every variant recorded with its fields (no timing assertions)."""
import json

import torch

from gmlib.model import GPT, GPTConfig
from helpers import load_script


def test_bench_decode_writes_one_row_per_variant(tmp_path):
    bench = load_script("bench/decode.py")
    out = tmp_path / "decode.json"
    args = ["--size", "tiny", "--vocab", "64", "--prompt-len", "8", "--new-tokens", "6", "--batch", "3",
            "--repeats", "1", "--out", str(out)]
    bench.main(args)
    rows = json.loads(out.read_text())
    assert {(r["k"], r["engine"], r["batch"]) for r in rows} == {
        (1, "reference", 1), (1, "static", 1), (1, "eager", 1), (1, "compiled", 1), (2, "reference", 1),
        (2, "static", 1), (1, "static", 3), (2, "static", 3)}
    for r in rows:
        assert {"model", "k", "tokens_per_s", "batch", "device", "commit"} <= set(r)
        assert r["model"] == "tiny" and r["tokens_per_s"] > 0 and r["device"].startswith("cpu") and r["commit"]
        assert r["cuda_graph"] is False and r["warnings"] == [] and r["relative_to_reference"] > 0
        assert r["same_tokens_as_reference"] == (6 if r["batch"] == 1 else None)  # fp32: every token
        assert r["split_logit_margin"] is None  # no split
    bench.main(args)  # a second run replaces its rows rather than adding to them
    assert len(json.loads(out.read_text())) == len(rows)


def test_split_margin_is_the_reference_logit_gap_between_the_two_tokens():
    bench = load_script("bench/decode.py")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, seq_len=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ctx = [1, 5, 7]
    with torch.no_grad():
        logits = model(torch.tensor([ctx]))[0][0, -1]
    a, b = int(logits.argmax()), int(logits.argmin())
    assert bench.split_margin(model, ctx, a, b) == float(logits[a] - logits[b]) > 0
