"""SASLprep (RFC 4013), the stringprep profile STUN applies to passwords.

RFC 8489 §9.2.2 names OpaqueString (RFC 8265) as the successor of SASLprep;
for passwords the two agree on everything a STUN deployment meets in practice
(ASCII, Latin, CJK), and SASLprep is what the RFC 5769 test vectors and most
deployed clients use.  The stdlib :mod:`stringprep` module carries the RFC 3454
tables, so no third-party dependency is needed.
"""

from __future__ import annotations

import stringprep
import unicodedata

__all__ = ["saslprep"]

# RFC 4013 §2.3: every table the profile prohibits.  C.1.1 (ASCII space) is
# deliberately absent: a plain space is allowed in passwords.
_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space characters
    stringprep.in_table_c21_c22,  # ASCII and non-ASCII control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogate codes
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties / deprecated
    stringprep.in_table_c9,  # tagging characters
)


def saslprep(s: str, *, allow_unassigned: bool = True) -> str:
    """Prepare ``s`` with the SASLprep profile (RFC 4013).

    ``allow_unassigned`` selects "query" semantics (RFC 3454 §7): code points
    unassigned in Unicode 3.2 pass through.  Keys are derived at query time and
    passwords made of newer characters (emoji) must keep working, so that is the
    default; pass ``False`` for "stored string" semantics.

    Raises ``ValueError`` on prohibited input.  The message never contains the
    input, because the input is usually a password.
    """
    if s.isascii() and s.isprintable():
        # Printable ASCII (every TURN REST password: base64) is its own SASLprep: no B.1 or
        # C.1.2 character, NFKC leaves it alone, nothing prohibited, no RandALCat. This path
        # skips a per-character table walk on every authenticated request.
        return s
    return _saslprep_tables(s, allow_unassigned)


def _saslprep_tables(s: str, allow_unassigned: bool) -> str:
    """The profile itself, table by table; :func:`saslprep` without its ASCII shortcut."""
    # RFC 4013 §2.1: non-ASCII spaces map to SPACE, "commonly mapped to nothing"
    # (B.1: soft hyphen, zero-width joiners, variation selectors...) disappears.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in s
        if not stringprep.in_table_b1(ch)
    )
    # RFC 4013 §2.2: NFKC, with the Unicode version the stringprep tables use
    # so that mapping and prohibition agree with each other.
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not normalized:
        return normalized

    for position, ch in enumerate(normalized):
        # RFC 4013 §2.3: prohibited output.
        if any(in_table(ch) for in_table in _PROHIBITED):
            raise ValueError(f"SASLprep: prohibited character at position {position}")
        # RFC 4013 §2.5: unassigned code points only for queries.
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise ValueError(f"SASLprep: unassigned code point at position {position}")

    # RFC 4013 §2.4 -> RFC 3454 §6: bidirectional text.  A string with any
    # right-to-left character must not contain left-to-right ones and must
    # start and end with a right-to-left character.
    has_rtl = any(stringprep.in_table_d1(ch) for ch in normalized)
    if has_rtl:
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            raise ValueError("SASLprep: mixes left-to-right and right-to-left text")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("SASLprep: right-to-left text must start and end with a right-to-left character")
    return normalized
