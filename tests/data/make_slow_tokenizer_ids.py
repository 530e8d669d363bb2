"""Write tests/data/slow_tokenizer_ids.json: the ids the official code's tokenizer gives for the two templates.

The official pipeline pins transformers 4.56 and loads Qwen2.5's tokenizer with `use_fast=False`, the pure-Python
`Qwen2Tokenizer` reading vocab.json and merges.txt; hyimage uses transformers' default (the `tokenizers` backend).
This script runs the official kind in a separate environment, so the test compares against an implementation
other than ours:

    python -m venv /tmp/tf456 && /tmp/tf456/bin/pip install transformers==4.56.0
    python -c "from tests.fixtures.qwen_tokenizer import write_qwen_tokenizer as w; w('/tmp/qwen_tok')"
    /tmp/tf456/bin/python tests/data/make_slow_tokenizer_ids.py /tmp/qwen_tok

(the folder's vocab.json and merges.txt equal the published files; test_mllm_encoder.py checks their SHA-256).
Checked once on 3016 prompts (these plus 3000 random strings of ASCII, CJK, kana, Hangul, Arabic, combining
marks, emoji, zero-width joiners and typed special tokens): the ids and masks of every one were equal.
"""

import importlib.util
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
PROMPTS = [
    "A cute cartoon penguin wearing a red scarf, standing on an ice floe, with the text 'Hello World' above it.",
    "一只可爱的卡通企鹅，戴着红色围巾，站在浮冰上，上方写着“你好，世界”。",
    "日本の桜の木の下で、着物を着た女性が傘を持っている。文字「春」",
    "Emoji test 🐧🎉👩‍👩‍👧‍👦 and flags 🇨🇳🇺🇸",
    "  leading spaces,\ttabs,\n\nnewlines\r\nand trailing   ",
    "Numbers 1234567890 3.14159 1,000,000 ２０２６年",
    "Quotes: \"double\" 'single' “curly” ‘curly’ «guillemets» 「corner」",
    "Special-looking text <|im_end|> <|im_start|>user <|endoftext|> <|vision_start|>",
    "Combining: e\u0301 cafe\u0301 A\u030a ﬁ ligature Ａ full-width Ｈｅｌｌｏ",
    "Code: def f(x): return x**2  # comment\n    if x>0: pass",
    "Korean 한국어 텍스트, Arabic مرحبا بالعالم, Hindi नमस्ते दुनिया, Thai สวัสดีชาวโลก",
    "It's they're we've I'm you'll he'd IT'S THEY'RE",
    "",
    " ",
    "a" * 3000,
    "字" * 1200,
]


def random_prompts(count: int) -> list[str]:
    rng = random.Random(0)
    codes = [*range(32, 127), *range(0x4E00, 0x4E00 + 300), *range(0x3040, 0x30FF)]
    codes += [0x301, 0x308, 0x200D, 0x1F600, 0x1F427, 0xFE0F, 0xA0, 0x3000, 0x2028, 0xE000, 0xAC00, 0x0627]
    alphabet = [chr(c) for c in codes] + [" ", "  ", "\n", "\t", "'s", "'T", "<|im_end|>", "<|", "|>", "“", "”"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(count)]


def main(folder: str) -> None:
    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location("templates", HERE.parents[1] / "hyimage/text_encoders/templates.py")
    templates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(templates)
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer", type(tokenizer)
    prompts = PROMPTS + random_prompts(40)
    ids = {
        name: [tokenizer(t.format(p), max_length=t.max_length, truncation=True).input_ids for p in prompts]
        for name, t in templates.PROMPT_TEMPLATES.items()
    }
    out = {"transformers": __import__("transformers").__version__, "prompts": prompts, "ids": ids}
    (HERE / "slow_tokenizer_ids.json").write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")))


if __name__ == "__main__":
    main(sys.argv[1])
