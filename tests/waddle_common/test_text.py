"""The shared character rules agree with Unicode's own categories."""

from __future__ import annotations

import sys
import unicodedata

from waddle_common.text import has_control_chars, has_nul, has_surrogates


def test_rules_match_unicode_categories_for_every_code_point() -> None:
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        category = unicodedata.category(char)
        assert has_control_chars(f"a{char}b") is (category == "Cc"), hex(code)
        assert has_surrogates(f"a{char}b") is (category == "Cs"), hex(code)
        assert has_nul(f"a{char}b") is (code == 0), hex(code)


def test_clean_text_passes() -> None:
    for text in ("", "alice", "Renée \U0001f427", "\u200f\u202e\ufeff", "a b\u00a0c"):
        assert not has_nul(text) and not has_control_chars(text) and not has_surrogates(text)
