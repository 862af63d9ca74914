"""SentencePiece unigram tokenizer that round-trips text exactly.

Bits per byte is computed from the UTF-8 length of the original text, so decode(encode(t))
must give back t byte for byte. That needs: the `identity` normalisation rule (no NFKC),
`remove_extra_whitespaces=False` (runs of spaces survive), byte fallback (any character the
vocabulary lacks becomes its UTF-8 bytes instead of <unk>), `add_dummy_prefix=False` (no
space invented at the start), and "\n" as a user-defined piece (SentencePiece trains on
lines, so without it every newline would cost a byte-fallback token). Digits are split one
per piece so that numbers tokenize uniformly.

Ids: 0 <unk>, 1 <s> (bos, written before every document in the shards), 2 </s>, no pad.
"""
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from gmlib import atomic, checks

# byte fallback needs its 256 byte pieces, plus <unk>, <s>, </s> and "\n", plus room to learn
MIN_VOCAB, MAX_VOCAB = 300, 256_000


@dataclass
class TokenizerConfig:
    vocab_size: int = 2000
    character_coverage: float = 0.9995
    max_sentence_chars: int = 2000       # training "sentences" are lines/paragraphs cut to this length
    input_sentence_size: int = 2_000_000  # SentencePiece samples at most this many sentences
    num_threads: int = 2
    seed: int = 0

    def __post_init__(self):
        checks.check_types(self, "TokenizerConfig")
        checks.in_range(self.vocab_size, "TokenizerConfig.vocab_size", MIN_VOCAB, MAX_VOCAB,
                        "byte fallback needs 256 byte pieces and the specials, plus room for real pieces")
        checks.fractions(self, "TokenizerConfig", "character_coverage")
        checks.at_least(self, "TokenizerConfig", max_sentence_chars=1, input_sentence_size=1, num_threads=1)


def _sentences(texts, max_chars: int):
    """Split documents into the lines SentencePiece trains on (it drops lines > 4192 bytes)."""
    for t in texts:
        for line in t.split("\n"):
            for i in range(0, len(line), max_chars):
                piece = line[i:i + max_chars]
                if piece.strip():
                    yield piece


def train(texts, model_path, cfg: TokenizerConfig | None = None) -> spm.SentencePieceProcessor:
    """Train on an iterable of document strings; write `model_path` atomically; return the model."""
    cfg = cfg or TokenizerConfig()
    buf = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)  # sentence sampling/shuffling is then reproducible
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts, cfg.max_sentence_chars), model_writer=buf,
        model_type="unigram", vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=cfg.input_sentence_size, shuffle_input_sentence=True,
        max_sentence_length=4 * cfg.max_sentence_chars + 16, num_threads=cfg.num_threads,
        seed_sentencepiece_size=1_000_000, minloglevel=2)
    atomic.write_bytes(model_path, buf.getvalue())
    return load(model_path)


def load(model_path) -> spm.SentencePieceProcessor:
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer model (run notebooks/02_tokenizer.ipynb first)")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:  # SentencePiece says "unk is not defined" for an empty file
        raise ValueError(f"{path}: not a usable SentencePiece model ({path.stat().st_size} bytes; {e}); "
                         f"delete it and rerun notebooks/02_tokenizer.ipynb") from e


def train_on_split(clean_dir, model_path, cfg: TokenizerConfig | None = None, sample_bytes: int | None = None) -> dict:
    """Train on (a sample of about `sample_bytes` of) clean_dir/train, unless `model_path` was
    already trained with the same parameters on the same data (marker <model>.json)."""
    from . import stages
    from .prepare import iter_split
    from .split import text_hash
    cfg = cfg or TokenizerConfig()
    clean_dir, model_path = Path(clean_dir), Path(model_path)
    cmeta = json.loads((clean_dir / "meta.json").read_text())
    phash = stages.params_hash("tokenizer", cfg, sample_bytes, cmeta["params_hash"], stages.output_hashes(cmeta))
    marker = model_path.with_suffix(".json")
    if (meta := stages.done(marker, phash)) is not None:
        return meta
    if stale := atomic.remove_stale(model_path.parent, recursive=False):
        print(f"removed {len(stale)} temporary file(s) left by a killed run, e.g. {stale[0]}")
    total = sum(c["bytes"] for c in cmeta["counts"]["train"].values())
    p = 1.0 if not sample_bytes else min(1.0, sample_bytes / max(total, 1))
    used = {"docs": 0, "bytes": 0}

    def sample():  # by a salted hash of the text: the same sample every run, spread over all sources
        for d in iter_split(clean_dir, "train"):
            if p >= 1.0 or text_hash(d["text"], b"tok") < p:
                used["docs"] += 1
                used["bytes"] += len(d["text"].encode("utf-8"))
                yield d["text"]
    t0 = time.time()
    train(sample(), model_path, cfg)
    meta = {"vocab_size": cfg.vocab_size, "sample_docs": used["docs"], "sample_bytes": used["bytes"],
            "train_bytes_total": total, "seconds": round(time.time() - t0, 2)}
    return stages.finish(marker, phash, meta, outputs=[model_path])


def longest_pieces(sp, n: int = 20) -> list[str]:
    """The n longest ordinary pieces (by characters), '▁' shown as a space."""
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    return [p.replace("\u2581", " ") for p in sorted(pieces, key=lambda p: (-len(p), p))[:n]]


def segment(sp, text: str) -> str:
    """The text with its pieces separated by '|' (for showing example segmentations)."""
    return "|".join(sp.encode(text, out_type=str)).replace("\u2581", " ")
