"""SASLprep (RFC 4013), including every example of RFC 4013 §3."""

import pytest
from hypothesis import given, settings, strategies as st

from turnserver.auth import saslprep
from turnserver.auth.saslprep import _saslprep_tables


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("I\u00adX", "IX"),  # RFC 4013 §3 #1: SOFT HYPHEN mapped to nothing
        ("user", "user"),  # #2: no transformation
        ("USER", "USER"),  # #3: case preserved
        ("\u00aa", "a"),  # #4: output is NFKC
        ("\u2168", "IX"),  # #5: ROMAN NUMERAL NINE -> "IX" under NFKC
        ("TheMatr\u00adIX", "TheMatrIX"),
        ("The\u00adM\u00aatr\u2168", "TheMatrIX"),  # RFC 5769 §2.4 password before SASLprep
    ],
)
def test_rfc4013_section3_examples(given: str, expected: str) -> None:
    assert saslprep(given) == expected


def test_rfc4013_section3_example6_prohibited_control_character() -> None:
    with pytest.raises(ValueError, match="prohibited"):
        saslprep("\u0007")


def test_rfc4013_section3_example7_bidi_check() -> None:
    # ARABIC LETTER ALEF followed by DIGIT ONE: starts RTL but ends with a non-RTL character.
    with pytest.raises(ValueError, match="right-to-left"):
        saslprep("\u0627\u0031")


def test_rtl_only_string_passes_bidi_check() -> None:
    assert saslprep("\u0627\u0031\u0628") == "\u0627\u0031\u0628"


def test_mixed_rtl_and_ltr_is_refused() -> None:
    with pytest.raises(ValueError, match="mixes"):
        saslprep("\u0627a\u0628")


def test_non_ascii_space_maps_to_space() -> None:
    # RFC 4013 §2.1: C.1.2 characters (here NO-BREAK SPACE and IDEOGRAPHIC SPACE) become U+0020.
    assert saslprep("a\u00a0b\u3000c") == "a b c"


def test_ascii_space_is_allowed() -> None:
    assert saslprep("correct horse") == "correct horse"


def test_zero_width_characters_mapped_to_nothing() -> None:
    assert saslprep("pa\u200bss\u200dwo\ufe0frd") == "password"


@pytest.mark.parametrize(
    "bad",
    [
        "a\u0000b",  # C.2.1 ASCII control
        "a\u0085b",  # C.2.2 non-ASCII control
        "a\ue000b",  # C.3 private use
        "a\ufffeb",  # C.4 non-character
        "a\ufffdb",  # C.6 inappropriate for plain text
        "a\u2ff0b",  # C.7 inappropriate for canonical representation
        "a\u200eb",  # C.8 LEFT-TO-RIGHT MARK
        "a\U000e0001b",  # C.9 tagging
    ],
)
def test_prohibited_tables(bad: str) -> None:
    with pytest.raises(ValueError):
        saslprep(bad)


def test_error_message_does_not_echo_input() -> None:
    secret = "s3cret\u0007pw"
    with pytest.raises(ValueError) as info:
        saslprep(secret)
    assert "s3cret" not in str(info.value)


def test_unassigned_allowed_for_queries_refused_for_stored_strings() -> None:
    emoji = "pw\U0001f600"  # unassigned in Unicode 3.2
    assert saslprep(emoji) == emoji
    with pytest.raises(ValueError, match="unassigned"):
        saslprep(emoji, allow_unassigned=False)


def test_empty_string() -> None:
    assert saslprep("") == ""
    assert saslprep("\u00ad") == ""


PRINTABLE_ASCII = "".join(chr(code) for code in range(0x20, 0x7F))


@pytest.mark.parametrize("allow_unassigned", [True, False])
def test_printable_ascii_fast_path_agrees_with_the_table_driven_profile(allow_unassigned: bool) -> None:
    # saslprep() returns printable ASCII without walking the tables; the tables must agree.
    for text in (*PRINTABLE_ASCII, PRINTABLE_ASCII, "ysUR/Qz5Ey0t1s1zg6XDV2ioWPI=", " lead and trail "):
        assert saslprep(text, allow_unassigned=allow_unassigned) == text
        assert _saslprep_tables(text, allow_unassigned) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=40))
def test_ascii_passwords_come_out_as_the_table_driven_profile_gives_them(text: str) -> None:
    # Control characters (0x00-0x1F, 0x7F) are not printable: they take the table path and fail.
    try:
        expected = _saslprep_tables(text, True)
    except ValueError:
        with pytest.raises(ValueError):
            saslprep(text)
    else:
        assert saslprep(text) == expected
