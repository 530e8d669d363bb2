"""What the official PromptEnhancer code asks each reprompt model, and how it reads the answer."""

import re

SYSTEM_PROMPT_7B = (
    "你是一位图像生成提示词撰写专家，请根据用户输入的提示词，改写生成新的提示词，改写后的提示词要求："
    "1 改写后提示词包含的主体/动作/数量/风格/布局/关系/属性/文字等 必须和改写前的意图一致； "
    "2 在宏观上遵循“总-分-总”的结构，确保信息的层次清晰；"
    "3 客观中立，避免主观臆断和情感评价；"
    "4 由主到次，始终先描述最重要的元素，再描述次要和背景元素；"
    "5 逻辑清晰，严格遵循空间逻辑或主次逻辑，使读者能在大脑中重建画面；"
    "6 结尾点题，必须用一句话总结图像的整体风格或类型。"
)
"""System message of the 7B model (in English: rewrite the prompt keeping subject, action, count,
style, layout, relations, attributes and text; overall-detail-overall structure; objective; most
important first; spatially logical; end with one sentence naming the style or type)."""

SYSTEM_PROMPT_32B = "请根据用户的输入，生成思考过程的思维链并改写提示词："
"""Instruction of PromptEnhancer-32B, put before the user's prompt in one user message
(in English: from the user's input, produce a chain of thought, then rewrite the prompt)."""

ANSWER_7B = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
QUOTED_IN_SINGLE = re.compile(r"\B'([^']*)'\B")


def normalize_quotes(text: str) -> str:
    """Quotes as the glyph encoder reads them: `'x'` standing alone becomes `"x"`, `‘x’` becomes `“x”`.

    Apostrophes inside words are kept (the pattern needs a non-word boundary on both sides).
    """
    text = QUOTED_IN_SINGLE.sub(r'"\1"', text)
    return text.replace("’", "”").replace("‘", "“")


def user_message_32b(prompt: str) -> str:
    """The single user message the 32B model gets."""
    return f"{SYSTEM_PROMPT_32B}\n{prompt}"


def extract_answer_7b(generated: str) -> str:
    """The first `<answer>...</answer>` of the 7B's output, stripped, quotes normalised."""
    matches = ANSWER_7B.findall(generated)
    if not matches:
        raise ValueError("the 7B output has no <answer>...</answer>")
    answer = normalize_quotes(matches[0].strip())
    if not answer:
        raise ValueError("the 7B answer is empty")
    return answer


def extract_answer_32b(generated: str) -> str:
    """The text after the 32B's `<think>...</think>`, one leading newline dropped, quotes normalised."""
    count = generated.count("think>")
    if count != 2:
        raise ValueError(f"the 32B output has {count} think tags instead of <think> and </think>")
    answer = generated.split("think>")[-1]
    answer = normalize_quotes(answer.removeprefix("\n"))
    if not answer.strip():
        raise ValueError("the 32B answer after </think> is empty")
    return answer
