"""Small Hugging Face fast tokenizers trained on local text, for the tests.

No hub access: each tokenizer is trained with the `tokenizers` library on a
few hundred KB of the Python standard library's own sources (plus a line of
CJK, emoji and accented text so those are not all unknown), wrapped in
`transformers.PreTrainedTokenizerFast`, and cached for the test session.

- `byte_bpe()`:   byte-level BPE (GPT-2 style): pieces of one multi-byte
                  character share offsets; no offset trimming.
- `byte_bpe_trimmed()`: the same model with ByteLevel(trim_offsets=True): the
                  leading space of " word" is left out of the token's offsets,
                  whitespace-only tokens get empty spans.
- `wordpiece()`:  BERT style, lowercasing + accent stripping; whitespace is
                  dropped (covered by no token).
- `unigram()`:    SentencePiece style Unigram with Metaspace ("▁" for spaces,
                  prepended to the text).

Each has the chat special tokens `<|im_start|>`, `<|im_end|>` and `<|eot|>`
and no chat template (tests set one on a copy with `with_template`).
"""
import copy
import functools
import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|eot|>"]
_EXTRA_TEXT = "漢字とかな、한국어 😀👍🏽 café naïve Ünïcödé ß İstanbul\n" * 20


@functools.lru_cache(maxsize=1)
def training_text(max_bytes: int = 300_000) -> list[str]:
    """A few hundred KB of the standard library's sources, in sorted file order."""
    folder = os.path.dirname(os.__file__)
    texts, total = [_EXTRA_TEXT], 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def _wrap(tokenizer: Tokenizer, **special) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    fast.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL_TOKENS})
    return fast


@functools.lru_cache(maxsize=1)
def _byte_bpe_model() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=1)
def byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(_byte_bpe_model().to_str())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _wrap(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@functools.lru_cache(maxsize=1)
def byte_bpe_trimmed() -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(_byte_bpe_model().to_str())
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return _wrap(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@functools.lru_cache(maxsize=1)
def wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=2000, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(training_text(), trainer=trainer)
    return _wrap(tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")


@functools.lru_cache(maxsize=1)
def unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=2000, show_progress=False, unk_token="<unk>",
                                      special_tokens=["<pad>", "<unk>", "</s>"])
    tok.train_from_iterator(training_text(), trainer=trainer)
    return _wrap(tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


ALL = {"byte_bpe": byte_bpe, "byte_bpe_trimmed": byte_bpe_trimmed,
       "wordpiece": wordpiece, "unigram": unigram}


def with_template(tokenizer: PreTrainedTokenizerFast, template: str | None) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` with `chat_template` set (None: no template)."""
    out = copy.deepcopy(tokenizer)
    out.chat_template = template
    return out


# ChatML, as Qwen writes it: a system turn only when the conversation has one.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A different template that inserts a default system message when there is none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}### System: You are a helpful assistant.<|eot|>{% endif %}"
    "{% for m in messages %}### {{ m['role'] | capitalize }}: {{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}### Assistant: {% endif %}"
)
