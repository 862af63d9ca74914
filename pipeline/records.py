"""The records of an evaluation run (notebook 05): metrics.json's models and PARus entries, and the
experiment's one-line-per-model summary.json. They are about the run, not the models: every number
in them was measured by gmlib.evaluate; here it is only arranged."""
import pandas as pd


def metrics_record(quality_df: pd.DataFrame, parus: dict) -> dict:
    """The machine-readable record: {reference, models: {name: {...}}, parus: {name: {style: {...}}}}.
    Per model: bpb and bpb_ci (micro, byte-weighted), bpb_macro and bpb_macro_ci (mean over
    sources), ppl_token, ppl_word, params_total, params_active, train_gpu_seconds (None if
    unknown), bpb_delta and bpb_macro_delta ({vs: the reference, value, ci}: paired), n_docs,
    n_sources, max_doc_tokens (None: whole documents). The reference is the table's first model."""
    models, first = {}, quality_df["model"].iloc[0]
    num = lambda v: None if v is None or pd.isna(v) else v  # noqa: E731
    for r in quality_df.to_dict("records"):
        models[r["model"]] = {"bpb": r["bpb"], "bpb_ci": [r["bpb_lo"], r["bpb_hi"]],
                              "bpb_macro": r["bpb_macro"], "bpb_macro_ci": [r["bpb_macro_lo"], r["bpb_macro_hi"]],
                              "ppl_token": r["ppl_token"], "ppl_word": r["ppl_word"],
                              "params_total": int(r["params_total"]),
                              "params_active": int(r["params_active"]),
                              "train_gpu_seconds": None if num(r["train_gpu_seconds"]) is None
                              else float(r["train_gpu_seconds"]),
                              "bpb_delta": {"vs": first, "value": r["bpb_delta"],
                                            "ci": [r["bpb_delta_lo"], r["bpb_delta_hi"]]},
                              "bpb_macro_delta": {"vs": first, "value": r["bpb_macro_delta"],
                                                  "ci": [r["bpb_macro_delta_lo"], r["bpb_macro_delta_hi"]]},
                              "n_docs": int(r["n_docs"]), "n_sources": int(r["n_sources"]),
                              "max_doc_tokens": None if num(r["max_doc_tokens"]) is None else int(r["max_doc_tokens"])}
    return {"reference": first, "models": models, "parus": parus}


def summary_record(record: dict, routers: dict, parus_style: str) -> dict:
    """The experiment's one-line-per-model record (results/<run>/summary.json) from metrics_record's
    output: bpb (micro and macro) with intervals, per-word perplexity, PARus accuracy in `parus_style`, training
    device-seconds, stored and active parameters, and the router of each gm model (None otherwise;
    routers maps model name -> router kind)."""
    out = {}
    for name, m in record["models"].items():
        p = record["parus"].get(name, {}).get(parus_style, {"acc": None, "ci": None})  # an oracle has no PARus
        out[name] = {"bpb": m["bpb"], "bpb_ci": m["bpb_ci"], "bpb_macro": m["bpb_macro"],
                     "bpb_macro_ci": m["bpb_macro_ci"],
                     "ppl_word": m["ppl_word"], "parus_acc": p["acc"],
                     "parus_ci": p["ci"], "train_gpu_seconds": m["train_gpu_seconds"],
                     "params_total": m["params_total"], "params_active": m["params_active"],
                     "router": routers.get(name)}
    return {"parus_style": parus_style, "models": out}
