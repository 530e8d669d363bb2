"""The glyph prompt: the quoted text of a prompt, formatted for the ByT5 glyph encoder.

Facts of the official pipeline (`HunyuanImagePipeline._encode_glyph`):
- Quoted text is found with three non-greedy, single-line patterns: ASCII double quotes `"..."`,
  Chinese single quotes `‘...’` and Chinese double quotes `“...”`. ASCII single quotes are not
  glyph text (apostrophes would otherwise pair up).
- The matches are listed by kind, not by position: every `"..."` first, then every `‘...’`, then
  every `“...”`. An empty pair `""` counts as a (empty) text.
- Each text becomes `Text "<text>". `; the official pipeline gives no colour or font, so no
  `<color-N>` or `<xx-font-N>` token is ever written.
"""

import re

QUOTE_PATTERNS = (
    re.compile(r'"(.*?)"'),
    re.compile(r"‘(.*?)’"),
    re.compile(r"“(.*?)”"),
)


def extract_glyph_texts(prompt: str) -> list[str]:
    """The quoted texts of `prompt`, in the official order (by quote kind, then by position)."""
    return [text for pattern in QUOTE_PATTERNS for text in pattern.findall(prompt)]


def format_glyph_prompt(texts: list[str]) -> str:
    """The ByT5 input for `texts`: `Text "<text>". ` per text; empty when there is none."""
    return "".join(f'Text "{text}". ' for text in texts)


def glyph_prompt(prompt: str) -> str | None:
    """The formatted glyph prompt of `prompt`, or None when it has no quoted text."""
    texts = extract_glyph_texts(prompt)
    return format_glyph_prompt(texts) if texts else None
