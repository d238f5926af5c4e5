"""docs/configuration.md is generated from the option registry and must not drift from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from turnserver.config import OPTIONS, SECTIONS, render_markdown

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"


def test_committed_reference_equals_render_markdown() -> None:
    # On failure: python -m turnserver.config --markdown > docs/configuration.md
    assert DOC.read_text(encoding="utf-8") == render_markdown()


def test_module_prints_the_reference() -> None:
    result = subprocess.run([sys.executable, "-m", "turnserver.config", "--markdown"],
                            capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_markdown()


def test_module_without_markdown_flag_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "turnserver.config"], capture_output=True,
                            text=True, timeout=60, cwd=REPO, check=False)
    assert result.returncode == 2
    assert "usage" in result.stderr


def option_block(text: str, name: str) -> str:
    start = text.index(f"### `{name}`\n")
    end = text.find("\n### ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_every_option_is_documented_with_its_spellings() -> None:
    text = render_markdown()
    for option in OPTIONS:
        block = option_block(text, option.name)
        assert option.help in block
        assert f"`{option.env}`" in block
        assert f"`{option.cli_flag}`" in block
        assert ("reloaded" if option.reload else "needs a restart") in block


def test_options_appear_under_their_section_in_registry_order() -> None:
    text = render_markdown()
    positions = [text.index(f"## {title}\n") for _, title in SECTIONS]
    assert positions == sorted(positions)
    for option in OPTIONS:
        at = text.index(f"### `{option.name}`")
        section_index = [name for name, _ in SECTIONS].index(option.section)
        assert positions[section_index] < at
        if section_index + 1 < len(positions):
            assert at < positions[section_index + 1]


def test_precedence_and_defaults_are_stated() -> None:
    text = render_markdown()
    first = text.index("1. a command-line flag")
    assert first < text.index("2. an environment variable") < text.index("3. the TOML file")
    assert "`/etc/turnd/turnd.toml`" in text
    assert "- Default: `49152`" in option_block(text, "relay_port_min")
    assert "- Default: unset" in option_block(text, "tls_cert_file")
    assert '- Default: `["0.0.0.0:3478", "[::]:3478"]`' in option_block(text, "listen_udp")
    assert "one of `debug`, `info`, `warning`, `error`" in option_block(text, "log_level")
    assert "TURND_SECRETS" in text


def test_the_toml_example_in_the_reference_loads(tmp_path: Path) -> None:
    from turnserver.config import load_config

    text = render_markdown()
    start = text.index("```toml\n") + len("```toml\n")
    example = text[start:text.index("```", start)]
    path = tmp_path / "example.toml"
    path.write_text(example, encoding="utf-8")
    config = load_config(str(path), env={})
    assert config.external_addresses == ("203.0.113.7=10.0.0.5",)
    assert config.secrets_file == "/etc/turnd/secrets"
