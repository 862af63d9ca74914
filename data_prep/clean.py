"""Cleaning one document: normalise, strip markup and boilerplate, then decide keep or drop.

`clean_text` repairs and normalises the text (ftfy for UTF-8 mojibake, HTML entities and
control characters, then NFC; `repair_mojibake` for lines that ftfy cannot fix: cp1251 text
read as Latin-1 and KOI8-R text read as cp1251), then, outside code blocks, removes HTML tags
and declarations, embed scripts and tweet-embed residue, Telegram/Markdown/AsciiDoc markup
(unbalanced `**`/`__` too), wiki reference markers, URLs, @mentions and placeholders ([USER]),
masks personal data (e-mail, phone, passport-like numbers) with a placeholder token, drops
boilerplate lines (calls to subscribe, channel footers, credits and tags, link labels,
hashtag lines, Instagram/Twitter embed residue; a leading emoji or bracket does not hide them),
lines without a letter, copies of a 5+-word line beyond its third (pdf page headers; not in the
books and wiki roles, where refrains repeat), and re-joins hard-wrapped lines (pdf2text, novels).
Code (AsciiDoc `----`/`....` blocks and Markdown ``` fences, which come back fenced with ```,
and `inline code`) is kept as it is: no re-joining, no markup stripping (`doc/**/*.txt` and
`__init__` stay); only personal data is masked in it.

`doc_filter` then applies the document rules in a fixed order and names the first that fails:
  empty          nothing left after cleaning
  too_short      fewer than `min_words` words
  not_russian    Cyrillic share of letters below `min_cyrillic`; or a doubtful document
                 (letters of other Cyrillic alphabets, many ъ) that lingua does not call Russian
  repetition     Gopher repetition rules (every role): a word longer than `max_word_chars`,
                 duplicated lines holding more than `max_dup_line_chars` of the characters,
                 the most frequent 2/3/4-gram covering too much, duplicated 5..10-grams
                 covering too much, or too many emoji/symbols per word
  stop_words     fewer than `min_stop_words` Russian stop words (1 for documents under
                 `short_doc_words` words: a headline has one "от" or "в"; none under `tiny_doc_words`)
  word_length    mean word length outside [min_mean_word_len, max_mean_word_len]; the lower
                 bound is `short_min_mean_word_len` for short documents ("ты мой сахар и в этом соль")
  dup_lines      share of lines that repeat an earlier line above `max_dup_line_frac`
  line_punct     share of lines ending in terminal punctuation (emoji, "…", ";", ":" count)
                 below `min_line_punct`; not applied to one-line documents
  newline_ratio  line breaks between non-empty lines per word above `max_newline_ratio`
                 (a paragraph break counts once)
The last five carry FineWeb-2's Russian thresholds as defaults. Those filters were tuned on web
crawl; a play (one speaker line per line) or a poem fails `dup_lines` / `newline_ratio` by
design, so they apply only to sources whose role is in `quality_roles`; a source can switch any
rule off (`skip_rules`) or change any threshold from the params file (prepare.DataConfig.source_rules).

The text repair and markup stripping are data_prep.markup's; the language and repetition signals
data_prep.quality's.
"""
import re
from collections import Counter
from dataclasses import dataclass, fields

from .markup import (EMAIL_TOKEN, ID_TOKEN, PHONE_TOKEN, mask_pii, normalize, protect_code,  # noqa: F401 (clean's API)
                     repair_mojibake, restore_code, strip_markup)
from .quality import CYR, STOP_WORDS, SYMBOL, is_doubtful, is_russian, repetitive

RULES = ("empty", "too_short", "not_russian", "repetition", "stop_words", "word_length", "dup_lines", "line_punct",
         "newline_ratio")


@dataclass
class CleanConfig:
    min_words: int = 5                  # the corpus has sentence- and tweet-level sources on purpose
    min_cyrillic: float = 0.5           # share of letters that are Cyrillic
    max_foreign_cyrillic: float = 0.01  # share of Cyrillic letters from other alphabets that makes a document doubtful
    max_hard_sign: float = 0.004        # share of ъ among Cyrillic letters that makes a document doubtful
    lang_id: bool = True                # ask lingua about doubtful documents (False: doubtful = not Russian)
    min_stop_words: int = 2             # FineWeb-2 (Gopher rule)
    short_doc_words: int = 20           # below this many words the stop-word and word-length rules are looser
    tiny_doc_words: int = 6             # below this many words no stop word is required ("Отличный банк, рекомендую")
    min_mean_word_len: float = 3.0      # FineWeb-2 Russian
    short_min_mean_word_len: float = 2.0
    max_mean_word_len: float = 11.0     # FineWeb-2 Russian
    max_dup_line_frac: float = 0.322    # FineWeb-2 Russian
    min_line_punct: float = 0.231       # FineWeb-2 Russian
    max_newline_ratio: float = 0.139    # FineWeb-2 Russian
    # Gopher repetition (Rae et al. 2021, table A1), every role
    max_word_chars: int = 100           # longest word (\S+ after URL removal); Russian words stay under 40
    max_dup_line_chars: float = 0.2     # characters in lines that repeat an earlier line
    max_top_ngram: tuple = (0.20, 0.18, 0.16)  # most frequent 2-, 3-, 4-gram: share of word characters
    max_dup_ngram: tuple = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # duplicated 5..10-grams: share of word characters
    max_symbol_ratio: float = 0.5       # emoji and other symbols per word
    rep_min_words: int = 100            # the n-gram rules need this many words: in a short post one repeated
                                        # phrase (the headline echoed in the text) already covers 20%
    rep_window_words: int = 5000        # the n-gram rules look at up to 4 windows of this many words
    quality_roles: tuple = ("web", "news", "social", "reviews")
    skip_rules: tuple = ()              # rules switched off for a source (params file: source_rules)
    unwrap_lines: bool = True
    strip_urls: bool = True
    strip_mentions: bool = True
    mask_pii: bool = True
    drop_repeated_lines: bool = True    # lines of 5+ words beyond their 3rd copy (not for books/wiki roles)

    def for_role(self, role: str) -> "CleanConfig":
        """The config a source of `role` starts from: books and wiki keep their repeated lines."""
        return self if role in self.quality_roles else self.with_overrides({"drop_repeated_lines": False})

    def with_overrides(self, overrides: dict, where: str = "source_rules") -> "CleanConfig":
        """A copy with fields replaced; unknown field names or rule names are an error naming `where`."""
        names = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"{where}: unknown cleaning setting(s) {bad}; known: {sorted(names)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        bad = sorted(set(kw.get("skip_rules", ())) - set(RULES))
        if bad:
            raise ValueError(f"{where}: unknown rule(s) {bad} in skip_rules; rules: {list(RULES)}")
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return CleanConfig(**{**d, **kw})


# --- lines ------------------------------------------------------------------------------------

_ASCIIDOC_LINE = re.compile(r"^(?:\[\[?[^\u0400-\u04ff\]]*\]\]?|-{4,}|={4,}|\.{4,}|\*{4,}|_{4,}|\+{4,}|"
                            r"(?:image|include|ifdef|endif|ifndef)::.*|:[\w-]+:.*|\(\(\(.*\)\)\)|<<[^>]*>>)$")
_ASCIIDOC_HEAD = re.compile(r"^(=+|\.(?=[А-ЯA-Z]))\s*")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff\ufffd\u00ad\ufe0f]")
_MANY_NL = re.compile(r"\n{3,}")
_LETTER = re.compile(r"[^\W\d_]")
_LEAD = r"^[^\w©—–-]{0,12}"  # emoji, bullets, brackets before the first word (not a dialogue dash)
# a line that starts with one of these is boilerplate (checked on lines under 120 characters);
# (?!\w) rather than \b, which fails after a non-word character such as © or ":"
_BOILERPLATE = re.compile(
    _LEAD + r"(?:читайте также|читать также|смотрите также|читайте нас|читать нас|подписывайтесь|подписывайся|"
    r"подпишитесь|подпишись|подписаться|подписка|поделиться|поделитесь|ставьте лайк|ставь лайк|источник|фото|видео|"
    r"реклама|erid|все права защищены|©|\([cс]\)|copyright|наш канал|наш телеграм|прислать новость|"
    r"предложить новость|ещё больше новостей|больше новостей|развернуть|свернуть|показать полностью|читать далее|"
    r"читать полностью|подробнее|далее|comments?|комментари|ответить|цитировать|нравится|like|share|tags?\s*:|"
    r"теги\s*:|метки\s*:|мы используем (?:файлы )?cookie|политика конфиденциальности|"
    r"пользовательское соглашение)(?!\w)",
    re.I)
# a call to subscribe anywhere in a short line ("Топор Live. Подписаться", "КиберТопор — Подписаться")
_SUBSCRIBE = re.compile(r"(?<!\w)(?:подписывайтесь|подписывайся|подпишитесь|подпишись|подписаться|ставьте лайк|"
                        r"прислать новость|читать нас без vpn|наш канал)(?!\w)", re.I)
# a line that is only a link label or a menu entry once the link is gone ("👉 Читать", "🔗 Зеркало")
_LABEL_LINE = re.compile(_LEAD + r"(?:читать|зеркало|смотреть|слушать|перейти|скачать|github|источник|ссылка|"
                         r"оригинал|подробности|playground|youtube|vk|вконтакте|telegram|телеграм|дзен|главная|войти|регистрация|поиск|"
                         r"меню|наверх|назад|вперёд|вперед|отправить|закрыть|принять|ок|ok|facebook|instagram|"
                         r"twitter|live)[^\w]{0,6}$", re.I)
_HASHTAGS = re.compile(r"^(?:#\w+[\s,.]*)+$")
# Instagram embed residue: "Публикация от <name> ()" and its "Июн 17 2017 в 1:05 PDT" line
_EMBED_RESIDUE = re.compile(r"^(?:Публикация от|A post shared by) .{0,100}$"
                            r"|^\w{3} \d{1,2},? \d{4} (?:в|at) \d{1,2}:\d{2} P[DS]T$")
# inline player and embed scripts (jwplayer, playbuzz, Twitter/Facebook widgets) left in scraped news
_SCRIPT_LINE = re.compile(r"jwplayer|playbuzz|\bfunction\s*\(|\bwindow\.|\bdocument\.|getElementById|"
                          r"encodeURIComponent|\.setup\(|^\s*(?:return|var|if\s*\()[^а-яё]*$|"
                          r"^[^а-яё]*(?:[{}]|\);|=\s*[\"'(\[{])[^а-яё]*$", re.I)


def _drop_line(line: str) -> bool:
    if _ASCIIDOC_LINE.match(line) or not _LETTER.search(line):
        return True
    if len(line) < 120 and (_BOILERPLATE.match(line) or _LABEL_LINE.match(line)):
        return True
    if len(line) < 100 and _SUBSCRIBE.search(line):
        return True
    if line[0] == "#" and _HASHTAGS.match(line):
        return True
    if len(line) < 120 and _EMBED_RESIDUE.match(line):
        return True
    return bool(_SCRIPT_LINE.search(line))


def drop_repeated_lines(lines: list[str], max_copies: int = 3) -> tuple[list[str], int]:
    """Keep a line of 5+ words only in its first `max_copies` occurrences: running page headers
    of pdf2text ("ISSN ... ИЗВЕСТИЯ ВУЗОВ"), footers repeated in one post. Shorter lines (speaker
    names, "— Нет.") are left alone; sources in the books and wiki roles skip this (refrains)."""
    seen, out, dropped = Counter(), [], 0
    for line in lines:
        if line.count(" ") >= 4:
            seen[line] += 1
            if seen[line] > max_copies:
                dropped += 1
                continue
        out.append(line)
    return out, dropped


def clean_lines(text: str, cfg: CleanConfig) -> tuple[str, int]:
    """Line-level cleanup: whitespace, markup-only and boilerplate lines, hard wraps.
    Returns the text and the number of boilerplate/markup lines removed. Code-block marker
    lines (from protect_code) are kept as they are."""
    text = _INVISIBLE.sub("", text)
    out, removed = [], 0
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if not line:
            out.append("")
            continue
        if line.endswith("\ue001CODE") and line.startswith("\ue000"):
            out.append(line)
            continue
        if _drop_line(line):
            removed += 1
            continue
        out.append(_ASCIIDOC_HEAD.sub("", line) if line[0] in "=." else line)
    if cfg.unwrap_lines:
        out = _unwrap(out)
    if cfg.drop_repeated_lines:
        out, n = drop_repeated_lines(out)
        removed += n
    text = _MANY_NL.sub("\n\n", "\n".join(out)).strip()
    return text, removed


_END = tuple(".!?…:;»\"')]>—–-*")


def _unwrap(lines: list[str]) -> list[str]:
    """Join a line with the next when it was evidently wrapped mid-sentence: the line is long,
    does not end a sentence, and the next starts with a lower-case letter. A word hyphenated
    across the break is re-joined. Verse and dialogue rarely meet all three conditions."""
    out = []
    for line in lines:
        if out and line and line[0].islower() and len(out[-1]) >= 40 and not out[-1].endswith("\ue001CODE"):
            prev = out[-1]
            if prev[-1] == "-" and len(prev) > 1 and prev[-2].isalpha():
                out[-1] = prev[:-1] + line
                continue
            if not prev.endswith(_END):
                out[-1] = prev + " " + line
                continue
        out.append(line)
    return out


def clean_normalized(text: str, cfg: CleanConfig) -> tuple[str, int]:
    """Markup and line cleanup of normalised text, code blocks kept intact."""
    text, code = protect_code(text, cfg.mask_pii)
    text, removed = clean_lines(strip_markup(text, cfg), cfg)
    return restore_code(text, code), removed


def clean_text(text: str, cfg: CleanConfig | None = None) -> tuple[str, int]:
    """Normalised, markup-free text and the number of lines removed as boilerplate/markup."""
    cfg = cfg or CleanConfig()
    return clean_normalized(normalize(text), cfg)


# --- document rules -------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_CODE_OUT = re.compile(r"(?ms)^```\n.*?\n```$|`[^`\n]{1,200}`")  # code as restore_code writes it
_PUNCT_END = tuple(".!?…\"'»);:")


def _ends_line(line: str) -> bool:
    return line.endswith(_PUNCT_END) or bool(SYMBOL.match(line[-1]))


def doc_filter(text: str, role: str = "web", cfg: CleanConfig | None = None) -> str | None:
    """Name of the first rule the cleaned `text` fails, or None to keep it."""
    cfg = cfg or CleanConfig()
    skip = cfg.skip_rules
    if not text.strip():
        return "empty"
    words = _WORD.findall(text)
    if len(words) < cfg.min_words and "too_short" not in skip:
        return "too_short"
    # code is neither Russian nor prose: commands and code repeat by nature and are in English
    prose = _CODE_OUT.sub(" ", text) if "`" in text else text
    if "not_russian" not in skip:
        n_letters = len(_LETTER.findall(prose))
        n_cyr = len(CYR.findall(prose))
        if n_letters == 0 or n_cyr < cfg.min_cyrillic * n_letters:
            return "not_russian"
        if is_doubtful(prose, n_cyr, cfg) and not is_russian(prose, cfg):
            return "not_russian"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if "repetition" not in skip:
        if "\n" in prose:
            prose = prose.split("\n", 1)[1]  # a headline echoed by the lead is not repetition
        if repetitive(prose, _WORD.findall(prose), [ln for ln in prose.split("\n") if ln.strip()], cfg):
            return "repetition"
    if role not in cfg.quality_roles:
        return None
    short = len(words) < cfg.short_doc_words
    need = 0 if len(words) < cfg.tiny_doc_words else 1 if short else cfg.min_stop_words
    if "stop_words" not in skip and sum(1 for w in words if w.lower() in STOP_WORDS) < need:
        return "stop_words"
    mean_len = sum(map(len, words)) / max(len(words), 1)
    lo = cfg.short_min_mean_word_len if short else cfg.min_mean_word_len
    if "word_length" not in skip and not lo <= mean_len <= cfg.max_mean_word_len:
        return "word_length"
    if "dup_lines" not in skip and len(lines) > 1 and \
            (len(lines) - len(set(lines))) / len(lines) > cfg.max_dup_line_frac:
        return "dup_lines"
    if "line_punct" not in skip and len(lines) > 1 and \
            sum(1 for ln in lines if _ends_line(ln)) / len(lines) < cfg.min_line_punct:
        return "line_punct"
    if "newline_ratio" not in skip and (len(lines) - 1) / max(len(words), 1) > cfg.max_newline_ratio:
        return "newline_ratio"
    return None
