"""The quality signals of data_prep.clean's document rules: is it Russian, and is it repetitive.

Language: the common case is decided by two regex counts (Cyrillic share, and the pre-check
below), at hundreds of MB/s. Only a *doubtful* document goes to lingua-language-detector
(offline, its models ship in the wheel; low-accuracy mode over the 8 Cyrillic languages it knows):
one that holds letters of other Cyrillic alphabets (і ї є ґ ў ј љ њ ћ џ ђ ѓ ќ ѕ ә ғ қ ң ө ұ ү һ),
or in which ъ is frequent (Bulgarian: ~2% of letters; Russian: ~0.03%), unless it has ѣ (pre-1918
Russian spelling, in no other language). Cost: loading the models takes ~50 ms once per process
and ~30 MB of memory; a call takes ~0.1 ms per short text and ~1 ms per 2 KB (the first 3000
characters are classified). On this corpus under 1% of documents are doubtful.

Repetition: Gopher's rules (Rae et al. 2021, table A1). The thresholds of both are fields of
data_prep.clean.CleanConfig.
"""
from __future__ import annotations  # CleanConfig is named in annotations only

import re
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .clean import CleanConfig

# the most frequent Russian function words (a subset of common stop-word lists)
STOP_WORDS = frozenset("""и в во не что он на я с со как а то все она так его но да ты к у же вы за бы по только
ее её мне было вот от меня еще ещё нет о из ему теперь когда даже ну ли если уже или ни быть был него до вас
нибудь опять уж вам ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя их чем была сам
чтоб без будто чего раз тоже себе под будет ж тогда кто этот того потому этого какой совсем ним здесь этом
один почти мой тем чтобы нее сейчас были куда зачем всех никогда можно при наконец два об другой хоть после
над больше тот через эти нас про всего них какая много разве три эту моя впрочем хорошо свою этой перед иногда
лучше чуть том нельзя такой им более всегда конечно всю между это""".split())


# --- language -------------------------------------------------------------------------------

CYR = re.compile(r"[\u0400-\u04ff]")
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

SYMBOL = re.compile(r"[\u2190-\u2bff\u2600-\u27bf\U0001f000-\U0001faff]")


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
    if len(SYMBOL.findall(text)) > cfg.max_symbol_ratio * max(len(words), 1) + 2:
        return True
    if len(words) < cfg.rep_min_words:
        return False
    low = [w.lower() for w in words]
    return any(_ngram_repetition(w, cfg) for w in _windows(low, cfg.rep_window_words))
