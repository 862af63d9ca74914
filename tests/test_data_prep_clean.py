"""Cleaning: each normalisation step and each document rule on hand-made inputs whose
outcome is computed by hand, plus the real documents of the conftest corpus."""
import pytest

from data_prep.clean import RULES, CleanConfig, clean_text, doc_filter, normalize

RU = "Это обычное русское предложение, и в нём нет ничего странного."  # 10 words, 2+ stop words


def test_mojibake_and_entities_are_repaired():
    broken = RU.encode("utf-8").decode("cp1251")  # the classic double-encoding: "Р­С‚Рѕ ..."
    assert broken != RU and normalize(broken) == RU
    assert clean_text("Цена &laquo;низкая&raquo; &amp;quot;да&amp;quot;")[0] == "Цена «низкая» \"да\""
    # NFC: "й" as и + combining breve becomes one code point
    assert normalize("и\u0306") == "й"


def test_html_markup_urls_mentions_are_stripped():
    raw = ("<div class='x'>Первая строка<br>вторая <b>жирная</b> строка</div><script>var a=1;</script>"
           "\nСмотри https://example.com/a?b=1 и www.test.ru сейчас @user_name: ага")
    text, _ = clean_text(raw, CleanConfig(unwrap_lines=False))
    assert text == "Первая строка\nвторая жирная строка\n\nСмотри и сейчас ага"  # </div> + newline: a paragraph break


def test_markdown_asciidoc_wiki_markers():
    raw = ("**Жирный** и __курсив__ и [ссылка](http://x.ru)\n[source,console]\n----\n== Заголовок\n"
           "Текст[1] с ((( индекс ))) сноской[12].")
    text, removed = clean_text(raw)
    assert text == "Жирный и курсив и ссылка\nЗаголовок\nТекст с сноской."
    assert removed == 2  # the [source,console] and ---- lines


def test_boilerplate_and_letterless_lines_are_dropped():
    raw = f"{RU}\nЧитайте также: другая новость\nПодписывайтесь на наш канал\n12\n* * *\n{RU}"
    text, removed = clean_text(raw)
    assert text == f"{RU}\n{RU}" and removed == 4


def test_unwrap_joins_hard_wrapped_lines_only():
    wrapped = ("Это очень длинная строка текста, которая была перенесена\n"
               "посреди предложения, как в pdf2text, и пере-\nнос слова тоже.")
    assert clean_text(wrapped)[0] == ("Это очень длинная строка текста, которая была перенесена "
                                      "посреди предложения, как в pdf2text, и перенос слова тоже.")
    verse = "Мороз и солнце; день чудесный!\nЕще ты дремлешь, друг прелестный"
    assert clean_text(verse)[0] == verse  # ends with punctuation / next starts upper case: kept


def test_whitespace_is_tidied():
    assert clean_text("  а\u00a0\u00a0б \t в\u200b  \n\n\n\nг  ")[0] == "а б в\n\nг"


@pytest.mark.parametrize("text,rule", [
    ("", "empty"),
    ("и в не на", "too_short"),
    ("This is plain English text with no Russian in it at all.", "not_russian"),
    ("Це звичайне українське речення, і в ньому є літери, які їх видають.", "not_russian"),
    ("Москва Петербург Новосибирск Екатеринбург Казань Самара Омск.", "stop_words"),
    ("и в а я с к у о ж и о у к с я а в и.", "word_length"),
])
def test_document_rules(text, rule):
    assert doc_filter(text, "web") == rule


def test_fineweb_thresholds_at_the_boundary():
    cfg = CleanConfig(skip_rules=("repetition",))  # the Gopher rules would catch the repeated lines first
    # duplicate lines: 3 of 9 lines repeat an earlier one -> 0.333 > 0.322
    lines = [f"Строка номер {i} и в ней есть слова." for i in range(6)]
    assert doc_filter("\n".join(lines + lines[:3]), "web", cfg) == "dup_lines"
    assert doc_filter("\n".join(lines + lines[:2]), "web", cfg) is None  # 2/8 = 0.25
    # line punctuation: 1 of 5 lines ends with '.', 0.2 < 0.231; 2 of 5 passes
    no_end = [f"Это строка {w} и в ней нет точки в конце" for w in "абвгд"]
    assert doc_filter("\n".join(no_end[:4] + [RU]), "web", cfg) == "line_punct"
    assert doc_filter("\n".join(no_end[:3] + [RU, "Да, и это тоже так."]), "web", cfg) is None
    # newline ratio: 2 newlines per 12 words = 0.167 > 0.139
    short = "Он пришёл домой.\nИ я тоже пришёл.\nА она ушла и всё."
    assert doc_filter(short, "web", cfg) == "newline_ratio"
    assert doc_filter(short.replace("\n", " "), "web", cfg) is None


def test_quality_rules_apply_only_to_quality_roles():
    play = "\n".join(["ГОРОДНИЧИЙ.", "Я пригласил вас, господа, с тем, чтобы сообщить вам неприятное известие.",
                      "АММОС ФЕДОРОВИЧ.", "Как ревизор?"] * 3)
    no_rep = CleanConfig(skip_rules=("repetition",))  # the play repeated 3 times is Gopher repetition in every role
    assert doc_filter(play, "books") == "repetition"
    assert doc_filter(play, "web", no_rep) == "dup_lines"
    assert doc_filter(play, "books", no_rep) is None
    assert doc_filter(play, "books", CleanConfig(quality_roles=("books",), skip_rules=("repetition",))) == "dup_lines"


def test_rules_are_the_documented_ones():
    assert RULES == ("empty", "too_short", "not_russian", "repetition", "stop_words", "word_length", "dup_lines",
                     "line_punct", "newline_ratio")


def test_cleaning_is_idempotent_on_real_documents(real_docs):
    for d in real_docs:
        once, _ = clean_text(d["text"])
        assert clean_text(once)[0] == once, d["source"]
