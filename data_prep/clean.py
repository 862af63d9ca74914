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

Language: the common case is decided by two regex counts (Cyrillic share, and the pre-check
below), at hundreds of MB/s. Only a *doubtful* document goes to lingua-language-detector
(offline, its models ship in the wheel; low-accuracy mode over the 8 Cyrillic languages it knows):
one that holds letters of other Cyrillic alphabets (і ї є ґ ў ј љ њ ћ џ ђ ѓ ќ ѕ ә ғ қ ң ө ұ ү һ),
or in which ъ is frequent (Bulgarian: ~2% of letters; Russian: ~0.03%), unless it has ѣ (pre-1918
Russian spelling, in no other language). Cost: loading the models takes ~50 ms once per process
and ~30 MB of memory; a call takes ~0.1 ms per short text and ~1 ms per 2 KB (the first 3000
characters are classified). On this corpus under 1% of documents are doubtful.
"""
import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, fields

import ftfy

RULES = ("empty", "too_short", "not_russian", "repetition", "stop_words", "word_length", "dup_lines", "line_punct",
         "newline_ratio")

# the most frequent Russian function words (a subset of common stop-word lists)
STOP_WORDS = frozenset("""и в во не что он на я с со как а то все она так его но да ты к у же вы за бы по только
ее её мне было вот от меня еще ещё нет о из ему теперь когда даже ну ли если уже или ни быть был него до вас
нибудь опять уж вам ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя их чем была сам
чтоб без будто чего раз тоже себе под будет ж тогда кто этот того потому этого какой совсем ним здесь этом
один почти мой тем чтобы нее сейчас были куда зачем всех никогда можно при наконец два об другой хоть после
над больше тот через эти нас про всего них какая много разве три эту моя впрочем хорошо свою этой перед иногда
лучше чуть том нельзя такой им более всегда конечно всю между это""".split())

# Placeholder tokens for masked personal data (kept in the text so the sentence still reads).
EMAIL_TOKEN, PHONE_TOKEN, ID_TOKEN = "[EMAIL]", "[PHONE]", "[ID]"


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


# --- mojibake -------------------------------------------------------------------------------

# a run of Latin-1 letters (cp1251 Cyrillic read as Latin-1 lands in À-ÿ), or a lower-case
# Cyrillic letter followed by capitals (KOI8-R read as cp1251 swaps the case of every letter)
_MOJI_SUSPECT = re.compile(r"[\u00c0-\u00ff]{3}|(?<![^\W\d_])[а-яё][А-ЯЁ]{2}")
_MOJI_REPAIRS = (("latin-1", "cp1251"), ("cp1252", "cp1251"), ("cp1251", "koi8-r"))
_RU_WORD = re.compile(r"(?<![^\W\d_])[а-яёА-ЯЁ]{2,}(?![^\W\d_])")
_LATIN1_RUN = re.compile(r"[\u00c0-\u00ff]+")  # cp1251 Cyrillic bytes 0xC0-0xFF read as Latin-1


def _russianness(s: str) -> float:
    """Lower-case and Capitalised Russian words (1), ALL-CAPS ones (0.5), stop words (+2): mojibake
    of either kind yields no Russian words or words of mixed case ("ьФП")."""
    score = 0.0
    for w in _RU_WORD.findall(s):
        if w.islower():
            score += 3 if w in STOP_WORDS else 1
        elif w[1:].islower():
            score += 1
        elif w.isupper():
            score += 0.5
    return score


def _latin1_runs(line: str) -> str:
    return _LATIN1_RUN.sub(lambda m: m.group(0).encode("latin-1").decode("cp1251"), line)


def repair_mojibake(text: str) -> str:
    """Repair, line by line, cp1251 text read as Latin-1 (or cp1252) and KOI8-R text read as cp1251.
    A line is re-decoded only when the round trip is exact and the result is clearly more
    Russian (_russianness more than doubles); otherwise it is left as it is."""
    if not _MOJI_SUSPECT.search(text):
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not _MOJI_SUSPECT.search(line):
            continue
        best, score = line, _russianness(line)
        for enc, dec in (*_MOJI_REPAIRS, (None, None)):
            try:  # (None, None): only the runs of Latin-1 letters (a line that also has Greek or math signs)
                cand = line.encode(enc).decode(dec) if enc else _latin1_runs(line)
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
            s = _russianness(cand)
            if s > 2 * score + 0.25:  # a lone ALL-CAPS word (0.5) from a line with no Russian at all counts
                best, score = cand, s
        lines[i] = best
    return "\n".join(lines)


def normalize(text: str) -> str:
    """ftfy repair (UTF-8 mojibake, entities, control characters, CRLF), line-wise repair of
    single-byte mojibake, and NFC composition. Curly quotes are kept: Russian typography uses them."""
    text = ftfy.fix_text(text, uncurl_quotes=False, fix_line_breaks=True, normalization="NFC")
    return unicodedata.normalize("NFC", repair_mojibake(text))


# --- code blocks ----------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"(?m)^(----|\.\.\.\.|```)[^\n]*\n.*?\n\1[ \t]*$", re.S)
_INLINE_CODE = re.compile(r"(?<!`)`[^`\n]{1,200}`(?!`)")
_CODE_MARK = re.compile(r"\ue000(\d+)\ue001")  # private-use characters: never in real text


def protect_code(text: str, mask: bool = True) -> tuple[str, list[str]]:
    """Replace code blocks and inline code by markers, so markup stripping and line re-joining
    never touch them. A block becomes a marker line of its own and comes back fenced with ```
    (whatever its fences were); personal data is masked in code too (`mask`)."""
    if "`" not in text and "----" not in text and "...." not in text:
        return text, []
    saved = []

    def block(m):
        code = m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0]
        saved.append("```\n" + (mask_pii(code) if mask else code) + "\n```")
        return f"\ue000{len(saved) - 1}\ue001CODE"

    def inline(m):
        saved.append(m.group(0))
        return f"\ue000{len(saved) - 1}\ue001"
    text = _CODE_BLOCK.sub(block, text)
    text = _INLINE_CODE.sub(inline, text)
    return text, saved


def restore_code(text: str, saved: list[str]) -> str:
    if not saved:
        return text
    text = text.replace("\ue001CODE", "\ue001")
    return _CODE_MARK.sub(lambda m: saved[int(m.group(1))], text)


# --- markup -----------------------------------------------------------------------------------

_SCRIPT = re.compile(r"<(script|style|noscript|iframe)\b.*?</\1\s*>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_DECL = re.compile(r"<[!?][^<>]{0,500}>")  # <!DOCTYPE ...>, <?xml ...?>
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|table|h[1-6]|blockquote|pre)\b[^<>]{0,300}>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9:-]*(?:\s[^<>]{0,500})?/?>")
_URL = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>«»\"']*"
                  r"|(?<![\w@.])(?:[\w-]+\.)+(?:com|ru|org|net|me|ly|io|su|info|tv|рф)/[^\s<>«»\"']*", re.I)
_ENTITY_LEFT = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{1,6}|#x[0-9a-fA-F]{1,5});")
_MENTION = re.compile(r"(?<![\w.])@\w{2,}:?")
_RT = re.compile(r"(?m)^RT\s*:?\s*")
_TWEET_EMBED = re.compile(r"(?m)^[ \t]*— [^\n]{0,80}\(@\w+\)[ \t]*(?:\n[ \t]*\d{1,2} \w+ \d{4}(?: г\.)?[ \t]*$)?")
_MD_LINK = re.compile(r"\[([^\]\n]{0,300})\]\((?:[^()\s]{1,500})\)")
_MD_EMPH = re.compile(r"(\*\*|__|~~|\|\|)(?=\S)(.{1,2000}?)(?<=\S)\1", re.S)
_MD_LEFTOVER = re.compile(r"\*{2,}|_{2,}|~~|\|\|")
_WIKI_REF = re.compile(r"\[(?:\d{1,3}|[a-zа-я]|примечание \d+|источник не указан[^\]]*|нет в источнике|править[^\]]*)\]", re.I)
_PLACEHOLDER = re.compile(r"\[(?:USER|USERNAME|URL|LINK|ССЫЛКА|ИМЯ|\*{3}|ссылка[^\]\n]{0,80}|id\d+\|)\]", re.I)
_ASCIIDOC_INDEX = re.compile(r"\(\(\(.*?\)\)\)")
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})*\.[a-zа-я]{2,12}(?![\w-])", re.I)
_PHONE = re.compile(r"(?=[+8(])(?<![\w+])(?:\+7|8|\+\d{1,3})[ \t(-]{0,2}\d{3,4}[ \t)-]{0,2}\d{2,3}[ \t-]?\d{2}[ \t-]?\d{2}(?!\d)"
                    r"|(?<![\w+])\(\d{3,5}\)[ \t]?\d{1,3}[ \t-]?\d{2}[ \t-]?\d{2}(?!\d)")
_PASSPORT = re.compile(r"(?i)(паспорт\w*|серия)([^\n\d]{0,20})\d{2}[ \t]?\d{2}[ \t№]{0,3}(?:номер[ \t]*)?\d{6}(?!\d)")


def mask_pii(text: str) -> str:
    """E-mail addresses, phone numbers and passport-like numbers -> placeholder tokens."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_TOKEN, text)
    text = _PASSPORT.sub(lambda m: m.group(1) + m.group(2) + ID_TOKEN, text)
    return _PHONE.sub(PHONE_TOKEN, text)


def strip_markup(text: str, cfg: CleanConfig) -> str:
    if "<" in text:
        text = _SCRIPT.sub(" ", text)
        text = _COMMENT.sub(" ", text)
        text = _DECL.sub(" ", text)
        text = _BLOCK_TAG.sub("\n", text)
        text = _TAG.sub("", text)
    for _ in range(2):  # double-escaped entities (&amp;quot;) are common in scraped text
        if "&" not in text:
            break
        text = html.unescape(text)
    if "&" in text:  # what is left is misspelt (&egarve;) or unknown: it cannot be decoded
        text = _ENTITY_LEFT.sub("", text)
    if "](" in text:
        text = _MD_LINK.sub(r"\1", text)
    if cfg.strip_urls:
        text = _URL.sub("", text)
    if "[" in text:
        text = _PLACEHOLDER.sub("", text)
    if cfg.mask_pii:
        text = mask_pii(text)
    if cfg.strip_mentions and "@" in text:
        text = _TWEET_EMBED.sub("", text)
        text = _RT.sub("", text)
        text = _MENTION.sub("", text)
    if "*" in text or "_" in text or "~" in text or "|" in text:
        text = _MD_EMPH.sub(r"\2", text)
        text = _MD_LEFTOVER.sub("", text)
    if "[" in text:
        text = _WIKI_REF.sub("", text)
    if "(((" in text:
        text = _ASCIIDOC_INDEX.sub("", text)
    return text


# --- lines ------------------------------------------------------------------------------------

_ASCIIDOC_LINE = re.compile(r"^(?:\[\[?[^\u0400-\u04ff\]]*\]\]?|-{4,}|={4,}|\.{4,}|\*{4,}|_{4,}|\+{4,}|(?:image|include|ifdef|endif|ifndef)::.*|:[\w-]+:.*|\(\(\(.*\)\)\)|<<[^>]*>>)$")
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
    r"теги\s*:|метки\s*:|мы используем (?:файлы )?cookie|политика конфиденциальности|пользовательское соглашение)(?!\w)",
    re.I)
# a call to subscribe anywhere in a short line ("Топор Live. Подписаться", "КиберТопор — Подписаться")
_SUBSCRIBE = re.compile(r"(?<!\w)(?:подписывайтесь|подписывайся|подпишитесь|подпишись|подписаться|ставьте лайк|"
                        r"прислать новость|читать нас без vpn|наш канал)(?!\w)", re.I)
# a line that is only a link label or a menu entry once the link is gone ("👉 Читать", "🔗 Зеркало")
_LABEL_LINE = re.compile(_LEAD + r"(?:читать|зеркало|смотреть|слушать|перейти|скачать|github|источник|ссылка|"
                         r"оригинал|подробности|playground|youtube|vk|вконтакте|telegram|телеграм|дзен|главная|войти|регистрация|поиск|"
                         r"меню|наверх|назад|вперёд|вперед|отправить|закрыть|принять|ок|ok|facebook|instagram|twitter|live)[^\w]{0,6}$", re.I)
_HASHTAGS = re.compile(r"^(?:#\w+[\s,.]*)+$")
# Instagram embed residue: "Публикация от <name> ()" and its "Июн 17 2017 в 1:05 PDT" line
_EMBED_RESIDUE = re.compile(r"^(?:Публикация от|A post shared by) .{0,100}$|^\w{3} \d{1,2},? \d{4} (?:в|at) \d{1,2}:\d{2} P[DS]T$")
# inline player and embed scripts (jwplayer, playbuzz, Twitter/Facebook widgets) left in scraped news
_SCRIPT_LINE = re.compile(r"jwplayer|playbuzz|\bfunction\s*\(|\bwindow\.|\bdocument\.|getElementById|"
                          r"encodeURIComponent|\.setup\(|^\s*(?:return|var|if\s*\()[^а-яё]*$|^[^а-яё]*(?:[{}]|\);|=\s*[\"'(\[{])[^а-яё]*$", re.I)


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


# --- language -------------------------------------------------------------------------------

_CYR = re.compile(r"[\u0400-\u04ff]")
_FOREIGN_CYR = re.compile(r"[\u0400\u0402-\u040f\u0450\u0452-\u0462\u0464-\u04ff]")  # not а-я, ё, ѣ
_detector = None


def _lingua():
    global _detector
    if _detector is None:
        from lingua import Language, LanguageDetectorBuilder
        langs = [Language.RUSSIAN, Language.UKRAINIAN, Language.BELARUSIAN, Language.BULGARIAN, Language.SERBIAN,
                 Language.MACEDONIAN, Language.KAZAKH, Language.MONGOLIAN]
        _detector = (LanguageDetectorBuilder.from_languages(*langs).with_low_accuracy_mode().build(), Language.RUSSIAN)
    return _detector


def is_doubtful(text: str, n_cyr: int, cfg: CleanConfig) -> bool:
    """The cheap pre-check: letters of other Cyrillic alphabets, or a frequent ъ (Bulgarian)."""
    if n_cyr == 0:
        return False
    if len(_FOREIGN_CYR.findall(text)) > cfg.max_foreign_cyrillic * n_cyr:
        return True
    return "ѣ" not in text and text.count("ъ") > cfg.max_hard_sign * n_cyr + 1


def is_russian(text: str, cfg: CleanConfig) -> bool:
    """lingua's verdict on a doubtful document (or False when language ID is switched off)."""
    if not cfg.lang_id:
        return False
    detector, russian = _lingua()
    return detector.detect_language_of(text[:3000]) == russian


# --- repetition (Gopher) ----------------------------------------------------------------------

_SYMBOL = re.compile(r"[\u2190-\u2bff\u2600-\u27bf\U0001f000-\U0001faff]")


def _windows(words: list[str], size: int) -> list[list[str]]:
    if len(words) <= 4 * size:
        return [words]
    step = (len(words) - size) // 3
    return [words[i * step:i * step + size] for i in range(4)]


def _ngram_repetition(words: list[str], cfg: CleanConfig) -> bool:
    """Gopher's top n-gram (2..4) and duplicated n-gram (5..10) character fractions exceeded?"""
    total = sum(map(len, words))
    if total == 0:
        return False
    for n, limit in zip((2, 3, 4), cfg.max_top_ngram):
        if len(words) < n + 1:
            break
        counts = Counter(zip(*(words[i:] for i in range(n))))
        gram, c = counts.most_common(1)[0]
        if c > 1 and c * sum(map(len, gram)) / total > limit:
            return True
    frac5 = 1.0  # set by the 5-gram round, which always runs first
    for n, limit in zip(range(5, 11), cfg.max_dup_ngram):
        if len(words) < 2 * n:
            break
        if n > 5 and frac5 <= min(cfg.max_dup_ngram):
            break  # words covered by duplicated n-grams (n > 5) are a subset of those of 5-grams
        grams = list(zip(*(words[i:] for i in range(n))))
        counts = Counter(grams)
        if len(counts) == len(grams):
            break  # no duplicated n-gram, hence none for larger n either
        covered = bytearray(len(words))
        for i, g in enumerate(grams):
            if counts[g] > 1:
                covered[i:i + n] = b"\x01" * n
        frac = sum(len(w) for w, c in zip(words, covered) if c) / total
        if frac > limit:
            return True
        if n == 5:
            frac5 = frac
    return False


def repetitive(text: str, words: list[str], lines: list[str], cfg: CleanConfig) -> bool:
    """The Gopher repetition rules, for every role. The n-gram rules see up to four windows of
    `rep_window_words` words (start, two middles, end) of a long book, which keeps them linear-
    time and cheap, and still catches spam, which repeats throughout."""
    if max(map(len, text.split()), default=0) > cfg.max_word_chars:
        return True
    if len(lines) > 1:
        seen, dup = set(), 0
        for line in lines:
            if line in seen:
                dup += len(line)
            seen.add(line)
        if dup / max(1, sum(map(len, lines))) > cfg.max_dup_line_chars:
            return True
    if len(_SYMBOL.findall(text)) > cfg.max_symbol_ratio * max(len(words), 1) + 2:
        return True
    if len(words) < cfg.rep_min_words:
        return False
    low = [w.lower() for w in words]
    return any(_ngram_repetition(w, cfg) for w in _windows(low, cfg.rep_window_words))


# --- document rules -------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_CODE_OUT = re.compile(r"(?ms)^```\n.*?\n```$|`[^`\n]{1,200}`")  # code as restore_code writes it
_PUNCT_END = tuple(".!?…\"'»);:")


def _ends_line(line: str) -> bool:
    return line.endswith(_PUNCT_END) or bool(_SYMBOL.match(line[-1]))


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
        n_cyr = len(_CYR.findall(prose))
        if n_letters == 0 or n_cyr < cfg.min_cyrillic * n_letters:
            return "not_russian"
        if is_doubtful(prose, n_cyr, cfg) and not is_russian(prose, cfg):
            return "not_russian"
    lines = [l for l in text.split("\n") if l.strip()]
    if "repetition" not in skip:
        if "\n" in prose:
            prose = prose.split("\n", 1)[1]  # a headline echoed by the lead is not repetition
        if repetitive(prose, _WORD.findall(prose), [l for l in prose.split("\n") if l.strip()], cfg):
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
    if "dup_lines" not in skip and len(lines) > 1 and (len(lines) - len(set(lines))) / len(lines) > cfg.max_dup_line_frac:
        return "dup_lines"
    if "line_punct" not in skip and len(lines) > 1 and \
            sum(1 for l in lines if _ends_line(l)) / len(lines) < cfg.min_line_punct:
        return "line_punct"
    if "newline_ratio" not in skip and (len(lines) - 1) / max(len(words), 1) > cfg.max_newline_ratio:
        return "newline_ratio"
    return None
