"""Publish a model of a run as a Hugging Face folder (gmlib.hf) with a model card from the run's records.

A model is named as 05_evaluate names it in results/<run>/summary.json: a dense checkpoint
(work/<run>/models/<name>/), one gm expert ("<gm>-expert<e>"), or a gm mixture ("<gm>-k<k>", or just
"<gm>": every expert, the router and the mixture settings); "best" is the model with the lowest held-out
bits per byte among those a Llama can hold (a gated MLP). The card says what the model is, what data and
compute made it, and its held-out numbers when 05 measured them. The tokenizer is the run's
work/<data_name>/tokenizer.model, data_name from 05's (or 03's) parameters.
"""
import json
import re
from pathlib import Path

import yaml

from . import atomic, hf
from .checkpoint import load_model, read_meta
from .model import GPTConfig
from .paths import results_dir, work_dir


def _summary(run: str) -> dict:
    path = results_dir(run) / "summary.json"
    return json.loads(path.read_text())["models"] if path.is_file() else {}


def resolve(run: str, model: str) -> dict:
    """{"name", "kind": dense | expert | gm, "path", "config": GPTConfig, "expert", "k"} of a model of the run."""
    if model == "best":
        return best(run)
    dense = work_dir(run) / "models" / model / "checkpoint.safetensors"
    if dense.is_file():
        return {"name": model, "kind": "dense", "path": dense, "config": GPTConfig(**read_meta(dense)["config"])}
    m = re.fullmatch(r"(.+?)(?:-expert(\d+)|-k(\d+))?", model)
    gm_dir = work_dir(run) / "gm" / m.group(1)
    if not (gm_dir / "gm.json").is_file():
        raise FileNotFoundError(f"model {model!r} of run {run!r}: neither {dense} nor {gm_dir / 'gm.json'} exists")
    info = json.loads((gm_dir / "gm.json").read_text())
    spec = {"name": model, "path": gm_dir, "config": GPTConfig(**info["model_config"]), "info": info}
    if m.group(2) is not None:
        e = int(m.group(2))
        if not 0 <= e < info["n_experts"]:
            raise ValueError(f"model {model!r}: {gm_dir} has experts 0..{info['n_experts'] - 1}")
        return {**spec, "kind": "expert", "expert": e}
    return {**spec, "kind": "gm", "k": int(m.group(3)) if m.group(3) else None}


def exportable(run: str, single: bool = False) -> list[dict]:
    """The models of the run that a Llama can hold (a gated MLP), best held-out bpb first (05's summary.json);
    with `single`, only dense models and single experts: what transformers alone can run."""
    models = _summary(run)
    if not models:
        raise FileNotFoundError(f"{results_dir(run) / 'summary.json'}: missing; run 05_evaluate first, "
                                "or name the model")
    out = []
    for name in sorted(models, key=lambda n: models[n]["bpb"]):
        try:
            spec = resolve(run, name)
        except FileNotFoundError:
            continue  # scored by 05 but its weights are not in this work/ folder
        if spec["config"].gated and not (single and spec["kind"] == "gm"):
            out.append(spec)
    return out


def best(run: str, single: bool = False) -> dict:
    if found := exportable(run, single):
        return found[0]
    raise ValueError(f"run {run!r}: no model a Llama can hold (a gated MLP: train with activation='swiglu')")


def data_name(run: str) -> str:
    for pattern in ("05_evaluate*.params.yaml", "03_train_dense*.params.yaml", "04_train_gm*.params.yaml"):
        for p in sorted(results_dir(run).glob(pattern)):
            if name := (yaml.safe_load(p.read_text()) or {}).get("data_name"):
                return name
    raise FileNotFoundError(f"{results_dir(run)}: no 05/03/04 params with a data_name, so no tokenizer to export")


def model_card(run: str, spec: dict, dtype_name: str) -> str:
    """README.md: what the model is, what trained it, and how well it scores (from the run's records)."""
    cfg, s = spec["config"], _summary(run).get(spec["name"], {})
    metrics_path = results_dir(run) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if spec["kind"] == "dense":
        acct = read_meta(spec["path"]).get("accounting", {})
        what = f"a dense GPT of {cfg.n_params / 1e6:.1f}M parameters"
    else:
        acct, n = spec["info"]["accounting"], spec["info"]["n_experts"]
        what = (f"expert {spec['expert']} of the gm `{spec['path'].name}` ({n} experts of {cfg.n_params / 1e6:.1f}M)"
                if spec["kind"] == "expert" else
                f"the gm `{spec['path'].name}`: {n} experts of {cfg.n_params / 1e6:.1f}M parameters, one Llama "
                f"folder each, with its router (`router/`) and mixture settings (`gm_hf.json`)")
        if spec["kind"] == "expert":
            acct = spec["info"]["records"][spec["expert"]]["accounting"]
    form = "each expert" if spec["kind"] == "gm" else "exported from gm as"
    lines = [f"# {spec['name']} (gm run `{run}`)", "", f"{what}, {form} `LlamaForCausalLM` ({dtype_name}).", "",
             "| | |", "|---|---|",
             f"| architecture | {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads of "
             f"{cfg.n_embd // cfg.n_head}, SwiGLU MLP {cfg.mlp_width}, RoPE θ {cfg.rope_base:g}, "
             f"context {cfg.seq_len}, vocab {cfg.vocab_size}, tied embeddings |"]
    data = metrics.get("data", {})
    if data:
        lines.append(f"| data | `{data.get('data_name', '?')}`: {data.get('docs_out', '?')} Russian documents, "
                     f"{data.get('bytes_out', 0) / 1e6:.1f} MB cleaned text (gm's data_prep) |")
    if acct:
        lines.append(f"| compute | {acct.get('tokens', 0):,} training tokens, "
                     f"{acct.get('gpu_seconds', 0):.0f} device-seconds "
                     f"on {acct.get('device', '?')}, {acct.get('flops', 0):.3g} FLOPs |")
    if s:
        lines.append(f"| held-out bits per byte (test split, 05_evaluate) | {s['bpb']:.4f} "
                     f"[{s['bpb_ci'][0]:.4f}, {s['bpb_ci'][1]:.4f}] |")
        lines.append(f"| held-out perplexity per word | {s['ppl_word']:.1f} |")
    use = ("from gmlib import hf\nlm = hf.mixture_lm(FOLDER)  # gmlib.mixture.MixtureLM" if spec["kind"] == "gm" else
           "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
           "tok = AutoTokenizer.from_pretrained(FOLDER)\nmodel = AutoModelForCausalLM.from_pretrained(FOLDER)")
    return "\n".join(lines + ["", "```python", use, "```", ""])


def export(run: str, model: str, out, dtype_name: str = "float32", k: int | None = None) -> dict:
    """Export `model` of `run` into the folder `out` (see the module docstring); returns the resolved spec."""
    spec = resolve(run, model)
    hf.check_exportable(spec["config"])
    tok = work_dir(data_name(run)) / "tokenizer.model"
    if not tok.is_file():
        raise FileNotFoundError(f"{tok}: the run's tokenizer is missing (run 02_tokenizer)")
    out, dtype = Path(out), hf.DTYPES[dtype_name]
    card = model_card(run, spec, dtype_name)
    if spec["kind"] == "dense":
        hf.export_gpt(load_model(spec["path"]), out, tok, dtype)
    elif spec["kind"] == "expert":
        from .serve import load_gm
        with load_gm(spec["path"], "cpu", pool=1) as gm:
            hf.export_gpt(gm.expert(spec["expert"]), out, tok, dtype)
    else:
        hf.export_gm(spec["path"], out, tok, dtype, mixture={"k": k or spec["k"] or 2}, card=card)
    if spec["kind"] != "gm":
        atomic.write_text(out / "README.md", card)
    return spec
