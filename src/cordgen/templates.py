"""Chat templates given in a recipe: the template itself, or a path to a file holding it. Read
by config (to check a recipe's sources before anything loads) and by prompts (to render)."""

from __future__ import annotations

from pathlib import Path

from cordgen.errors import ConfigError


def load_chat_template(value: str | None) -> str | None:
    """A template given as a path is read from disk; anything else is the template itself."""
    if value is None or "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"chat_template: {value!r} is neither a template nor an existing file")
    return path.read_text(encoding="utf-8")
