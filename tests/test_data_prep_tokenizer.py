"""The tokenizer round-trips exactly (bits per byte depends on it) and has the promised pieces."""
from data_prep import tokenizer

TRICKY = ["", " ", "  два пробела  в начале и конце  ", "\n\nабзац\n", "\tтаб\r\nCRLF",
          "числа 1234567890 и 3,14", "эмодзи 🤣👍🏽 и 漢字 и ǅ", "Ё ё Й й", "a\u0301 combining", "\x00\x01 control"]


def test_round_trip_exact(real_docs, tiny_tokenizer_path):
    sp = tokenizer.load(tiny_tokenizer_path)
    for t in TRICKY + [d["text"] for d in real_docs]:
        ids = sp.encode(t)
        assert sp.decode(ids) == t, repr(t[:80])
        assert sp.unk_id() not in ids  # byte fallback: nothing is unknown


def test_special_pieces(tiny_tokenizer_path):
    sp = tokenizer.load(tiny_tokenizer_path)
    assert sp.get_piece_size() == 1000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.encode("а\nб", out_type=str).count("\n") == 1          # newline is one piece
    assert [p for p in sp.encode("2024", out_type=str) if p != "▁"] == list("2024")  # split digits
    assert all(sp.is_byte(i) for i in sp.encode("🤣"))                # unseen: 4 byte pieces
    assert len(sp.encode("🤣")) == 4


def test_longest_pieces_and_segment(tiny_tokenizer_path):
    sp = tokenizer.load(tiny_tokenizer_path)
    longest = tokenizer.longest_pieces(sp, 5)
    assert len(longest) == 5 and len(longest[0]) >= len(longest[-1]) >= 3
    assert tokenizer.segment(sp, "мир").replace("|", "") == "мир"


def test_missing_model_is_a_clear_error(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError, match="02_tokenizer"):
        tokenizer.load(tmp_path / "none.model")
