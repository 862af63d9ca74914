"""gm's models as Hugging Face Llama checkpoints, both ways, and a whole gm in one folder.

gm's GPT is Llama's architecture once its MLP is gated (GPTConfig.activation="swiglu"): pre-norm
RMSNorm gains with eps 1e-6, RoPE in the rotate-half convention (each head's first half of dimensions
pairs with its second half, which is transformers' rotate_half, so q and k need no permutation, unlike
Meta's interleaved checkpoints), bias-free linears, tied input and output embeddings, as many key/value
heads as query heads, head_dim = n_embd / n_head. The weights map by name with two splits: gm's fused
qkv into q_proj/k_proj/v_proj and its fused [gate; up] into gate_proj/up_proj. A config that Llama
cannot hold (a non-gated MLP) is refused, naming the option.

The tokenizer: the SentencePiece model's pieces and scores become a `tokenizers` Unigram with byte
fallback and the settings gm's tokenizer is trained with (data_prep.tokenizer: identity normalisation,
no dummy prefix, "\\n" a user-defined piece), and <s> in front as in gm's shards. The folder names the
generic PreTrainedTokenizerFast class: transformers' LlamaTokenizer rebuilds its own pipeline (a prefix
space, Metaspace splitting) and would give other ids. The SentencePiece file rides along as
sentencepiece.model.

A whole gm: one Llama folder per expert, the router (gmlib.router's format), gm_hf.json with the
shares and the mixture settings, and a README.md model card; load_gm_hf serves it to gmlib.mixture
exactly as gmlib.serve.load_gm serves a trained gm.

transformers is imported inside the functions that need it, so training never loads it.
"""
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic
from .model import GPT, GPTConfig

FORMAT = "gm-hf-v1"
RMS_EPS = 1e-6          # gmlib.model's RMSNorm eps
WEIGHTS = "model.safetensors"
SP_FILE = "sentencepiece.model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# gm name -> Llama name inside block i (model.layers.i.); fused gm tensors split into equal row chunks
_LAYER = {"norm1.weight": "input_layernorm.weight", "attn.proj.weight": "self_attn.o_proj.weight",
          "norm2.weight": "post_attention_layernorm.weight", "mlp.proj.weight": "mlp.down_proj.weight"}
_FUSED = {"attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          "mlp.fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
_TOP = {"wte.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


# ---------------------------------------------------------------- config

def check_exportable(cfg: GPTConfig):
    if not cfg.gated:
        raise ValueError(f"GPTConfig.activation={cfg.activation!r} cannot be exported to Llama: a Llama checkpoint "
                         f"holds only the gated SwiGLU MLP (train with activation='swiglu')")


def llama_config(cfg: GPTConfig, dtype: torch.dtype = torch.float32, bos_id: int = 1, eos_id: int = 2):
    """The transformers LlamaConfig of a gm GPTConfig."""
    from transformers import LlamaConfig
    check_exportable(cfg)
    name = next((k for k, v in DTYPES.items() if v == dtype), None)
    if name is None:
        raise ValueError(f"dtype {dtype}: choose one of {sorted(DTYPES)}")
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head, hidden_act="silu",
        max_position_embeddings=cfg.seq_len, rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None, dtype=name)


def gpt_config(llama: dict, where="config.json") -> GPTConfig:
    """The gm GPTConfig of a Llama config.json dict; what gm's GPT cannot express is refused by name."""
    def need(key, ok, what):
        if not ok:
            raise ValueError(f"{where}: {key}={llama.get(key)!r} cannot be imported into gm's GPT ({what})")
    need("model_type", llama.get("model_type") == "llama", "only LlamaForCausalLM")
    need("hidden_act", llama.get("hidden_act", "silu") == "silu", "gm's gated MLP is SwiGLU")
    d, h = llama["hidden_size"], llama["num_attention_heads"]
    need("num_key_value_heads", llama.get("num_key_value_heads") in (None, h), "no grouped-query attention")
    need("head_dim", llama.get("head_dim") in (None, d // h), "head_dim must be hidden_size / num_attention_heads")
    need("attention_bias", not llama.get("attention_bias", False), "gm's linears have no bias")
    need("mlp_bias", not llama.get("mlp_bias", False), "gm's linears have no bias")
    need("tie_word_embeddings", llama.get("tie_word_embeddings", True), "gm ties the output to the embedding")
    need("rms_norm_eps", llama.get("rms_norm_eps") == RMS_EPS, f"gm's RMSNorm eps is {RMS_EPS}")
    rope = llama.get("rope_parameters") or {**(llama.get("rope_scaling") or {}),
                                            "rope_theta": llama.get("rope_theta", 10000.0)}
    need("rope_parameters", rope.get("rope_type", rope.get("type", "default")) == "default", "plain RoPE only")
    cfg = GPTConfig(vocab_size=llama["vocab_size"], seq_len=llama["max_position_embeddings"],
                    n_layer=llama["num_hidden_layers"], n_head=h, n_embd=d, rope_base=float(rope["rope_theta"]),
                    activation="swiglu")
    # a width gm would not derive itself is kept explicitly (0 keeps configs equal to gm-trained ones)
    if cfg.mlp_width == llama["intermediate_size"]:
        return cfg
    return GPTConfig(**{**asdict(cfg), "mlp_hidden": llama["intermediate_size"]})


# ---------------------------------------------------------------- weights

def to_llama_state(state: dict, cfg: GPTConfig) -> dict:
    """gm GPT state_dict -> Llama tensor names (views; the tied lm_head is left out, as transformers saves it)."""
    check_exportable(cfg)
    out = {hf: state[g] for g, hf in _TOP.items()}
    for i in range(cfg.n_layer):
        g, p = f"blocks.{i}.", f"model.layers.{i}."
        out.update({p + hf: state[g + k] for k, hf in _LAYER.items()})
        for k, names in _FUSED.items():
            out.update({p + hf: t for hf, t in zip(names, state[g + k].chunk(len(names)))})
    return out


def from_llama_state(tensors: dict, cfg: GPTConfig, where="model.safetensors") -> dict:
    """Llama tensors -> a gm GPT state_dict (an lm_head equal to the embedding is accepted and dropped)."""
    tensors = dict(tensors)
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
        raise ValueError(f"{where}: lm_head.weight differs from model.embed_tokens.weight; gm ties the two")
    out = {g: tensors.pop(hf) for g, hf in _TOP.items()}
    for i in range(cfg.n_layer):
        g, p = f"blocks.{i}.", f"model.layers.{i}."
        out.update({g + k: tensors.pop(p + hf) for k, hf in _LAYER.items()})
        out.update({g + k: torch.cat([tensors.pop(p + hf) for hf in names]) for k, names in _FUSED.items()})
    if tensors:
        raise ValueError(f"{where}: tensors gm's GPT has no place for: {sorted(tensors)[:5]}")
    return out


# ---------------------------------------------------------------- tokenizer

def hf_tokenizer(sp_path):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as the SentencePiece model at sp_path
    (trained by data_prep.tokenizer), <s> added in front."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    n = sp.get_piece_size()
    # byte pieces are reached by byte fallback only; a very low score keeps the text "<0x41>" from matching one
    vocab = [(sp.id_to_piece(i), -1e9 if sp.is_byte(i) else sp.get_score(i)) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    # user-defined pieces ("\n") are the ordinary-looking ones with score 0 (learned pieces have log-probs < 0)
    user = [i for i in range(n) if i not in special and not sp.is_byte(i) and not sp.is_unused(i)
            and sp.get_score(i) == 0.0]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")  # identity rule, no dummy prefix: spaces only
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    tok.add_tokens([AddedToken(sp.id_to_piece(i), special=False, normalized=False) for i in user])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, sp.bos_id())])
    return tok, sp


def save_tokenizer(sp_path, out, model_max_length: int, vocab_size: int | None = None):
    tok, sp = hf_tokenizer(sp_path)
    if vocab_size is not None and sp.get_piece_size() != vocab_size:
        raise ValueError(f"{sp_path}: {sp.get_piece_size()} pieces, but the model's vocab_size is {vocab_size}")
    out = Path(out)
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    atomic.write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    atomic.write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()), "add_bos_token": True,
        "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length})
    atomic.write_bytes(out / SP_FILE, Path(sp_path).read_bytes())
    return sp


# ---------------------------------------------------------------- one model

def export_gpt(model: GPT, out, tokenizer=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` as a LlamaForCausalLM folder: config.json, generation_config.json, model.safetensors
    (in `dtype`) and, given a SentencePiece model path, the tokenizer. Every file is written atomically."""
    from transformers import GenerationConfig
    out = Path(out)
    bos, eos = 1, 2
    cfg = llama_config(model.cfg, dtype, bos, eos)  # refuses a non-exportable model before anything is written
    if tokenizer is not None:
        sp = save_tokenizer(tokenizer, out, model.cfg.seq_len, model.cfg.vocab_size)
        bos, eos = sp.bos_id(), sp.eos_id()
        cfg.bos_token_id, cfg.eos_token_id = bos, eos
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in to_llama_state(state, model.cfg).items()}
    with atomic.atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic.write_text(out / "generation_config.json",
                      GenerationConfig(bos_token_id=bos, eos_token_id=eos).to_json_string(use_diff=True))
    atomic.write_text(out / "config.json", cfg.to_json_string())  # last: marks the folder complete
    return out


def import_gpt(folder, device="cpu") -> GPT:
    """A LlamaForCausalLM folder of a shape gm's GPT can hold -> a gm GPT (fp32 weights, eval mode)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (config.json and {WEIGHTS} needed)")
    cfg = gpt_config(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    with safe_open(folder / WEIGHTS, "pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    model = GPT(cfg)
    model.load_state_dict(from_llama_state(tensors, cfg, str(folder / WEIGHTS)))
    return model.to(device).eval()


def folder_dtype(folder) -> torch.dtype:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return DTYPES[cfg.get("dtype") or cfg.get("torch_dtype") or "float32"]  # torch_dtype: transformers 4's name


# ---------------------------------------------------------------- a whole gm

def export_gm(gm_dir, out, tokenizer=None, dtype: torch.dtype = torch.float32, mixture: dict | None = None,
              card: str = "") -> Path:
    """Every expert of the trained gm at gm_dir as a Llama folder out/expert_XXX, the router in out/router,
    gm_hf.json (experts, shares, model config, the mixture settings `mixture` as gmlib.mixture.MixtureConfig
    fields), and `card` as out/README.md. gm_hf.json is written last."""
    from .mixture import MixtureConfig
    from .serve import load_gm
    out = Path(out)
    with load_gm(gm_dir, "cpu", pool=1) as gm:
        check_exportable(gm.model_config)
        for e, name in enumerate(gm.experts):
            export_gpt(gm.expert(e), out / name, tokenizer, dtype)
    router, info = gm.router, gm.info
    if (out / "router").exists():
        shutil.rmtree(out / "router")
    router.save(out / "router")
    atomic.write_text(out / "README.md", card or f"# gm: a mixture of {info['n_experts']} Llama experts\n")
    atomic.write_json(out / "gm_hf.json", {
        "format": FORMAT, "n_experts": info["n_experts"], "experts": info["experts"], "shares": info["shares"],
        "router": info["router"], "router_path": "router", "model_config": info["model_config"],
        "mixture": asdict(MixtureConfig(**(mixture or {}))), "val_loss": info["val_loss"],
        "accounting": {k: v for k, v in info["accounting"].items() if k != "seed_run"}})
    return out


def load_gm_hf(folder, device="cpu", pool: int = 2):
    """(router, load_expert, info) for gmlib.mixture, as a trained gm's gmlib.serve.LoadedGM gives them
    (router, expert, info); the experts load from their Llama folders, at most `pool` of them kept in memory."""
    from collections import OrderedDict
    from .router import load_router
    folder = Path(folder)
    if not (folder / "gm_hf.json").is_file():
        raise FileNotFoundError(f"{folder}: no gm_hf.json, so not an exported gm (gmlib.hf.export_gm)")
    info = json.loads((folder / "gm_hf.json").read_text())
    router, models = load_router(folder / info["router_path"]), OrderedDict()

    def load_expert(e: int) -> GPT:
        if e not in models:
            if len(models) >= pool:
                models.popitem(last=False)
            models[e] = import_gpt(folder / info["experts"][e], device)
        models.move_to_end(e)
        return models[e]

    info["params_per_expert"] = GPTConfig(**info["model_config"]).n_params
    return router, load_expert, info


def mixture_lm(folder, device="cpu", **overrides):
    """The exported gm as a gmlib.mixture.MixtureLM, with its stored mixture settings (or overrides)."""
    from .mixture import MixtureConfig, MixtureLM
    stored = json.loads((Path(folder) / "gm_hf.json").read_text())
    mc = MixtureConfig(**{**stored["mixture"], **overrides})
    # as gmlib.serve.mixture_loader: the k experts are used together, log-linear pooling weighs them all
    pool = mc.experts_held(stored["n_experts"], at_least=2)
    router, load_expert, info = load_gm_hf(folder, device, pool=pool)
    return MixtureLM(load_expert, info["n_experts"], router, mc, expert_n_params=info["params_per_expert"])
