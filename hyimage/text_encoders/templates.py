"""The official prompt templates of the MLLM text encoder.

Each template wraps the user's prompt in a system instruction; the encoder tokenizes the whole text right-padded
to `text_length + crop_start` tokens and drops the first `crop_start` positions of its output, so `text_length`
positions remain.

The refiner's template `dit-llm-encode` is written in Llama-3 chat markup (`<|start_header_id|>` ...) that the
Qwen2.5 tokenizer does not know: it splits the markup into ordinary tokens and the instruction before the prompt
becomes 61 tokens, not the 36 that `crop_start` assumes. The official refiner therefore keeps the last 25
instruction tokens in front of the prompt and leaves 256 - 25 = 231 positions for the prompt itself. These are
the numbers the refiner was trained with, so they are kept as they are.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template: `text` holds one `{}` for the prompt."""

    name: str
    text: str
    crop_start: int
    text_length: int

    @property
    def max_length(self) -> int:
        """Tokens fed to the language model: the kept length plus the cropped instruction tokens."""
        return self.text_length + self.crop_start

    def format(self, prompt: str) -> str:
        return self.text.format(prompt)


INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:"
)

DIT_LLM_ENCODE_V2 = PromptTemplate(
    name="dit-llm-encode-v2",
    text=f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>",
    crop_start=34,
    text_length=1000,
)

DIT_LLM_ENCODE = PromptTemplate(
    name="dit-llm-encode",
    text=(
        f"<|start_header_id|>system<|end_header_id|>\n\n{INSTRUCTION}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    crop_start=36,
    text_length=256,
)

PROMPT_TEMPLATES = {template.name: template for template in (DIT_LLM_ENCODE_V2, DIT_LLM_ENCODE)}
"""Base and distilled models use `dit-llm-encode-v2`; the refiner uses `dit-llm-encode`."""


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """A template by name (or the template itself)."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template!r} is unknown; choose one of {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template]
