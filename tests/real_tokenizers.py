"""Real tokenizers and chat templates for the slow test tier, fetched from the package index.

Nothing here is committed to the repository: the files come from two packages,
downloaded with `pip download --no-deps` into a cache outside the repository
(`TIDE_TOKENIZER_CACHE`, default `~/.cache/tide-test-tokenizers`):

- the `llama-cpp-python` source distribution ships GGUF vocabularies in
  `vendor/llama.cpp/models/ggml-vocab-*.gguf` and real chat templates in
  `vendor/llama.cpp/models/templates/`; transformers converts a GGUF vocabulary
  to a fast tokenizer (it needs the `gguf` package: `pip install gguf`), and the
  conversion is cached as a tokenizer folder (`converted/<name>/`);
- the `mistral-common` wheel ships Mistral's tokenizers in `mistral_common/data/`:
  its Tekken vocabulary (`tekken_240718.json`, Mistral Nemo: tiktoken-style
  byte-level BPE) is converted here to a fast tokenizer (`tekken_tokenizer`; the
  merges are derived from the ranks, as transformers' TikTokenConverter does).
  Its SentencePiece `.model` files would need `sentencepiece`; the Llama-2
  SentencePiece GGUF, with Mistral v3's template, stands in for them.

`tokenizer(name)` returns a fast tokenizer or calls `pytest.skip` with the reason
(no network, pip failed, `gguf` missing, a conversion error).
"""
import functools
import os
import subprocess
import sys
import tarfile

import pytest

CACHE = os.path.expanduser(os.environ.get("TIDE_TOKENIZER_CACHE", "~/.cache/tide-test-tokenizers"))
LLAMA_CPP = "llama-cpp-python==0.3.36"
MISTRAL_COMMON = "mistral-common==1.13.1"
TEKKEN = "mistral_common/data/tekken_240718.json"
MODELS = "vendor/llama.cpp/models"

# name: (GGUF vocabulary, chat template file or None, what it stands for)
GGUF = {
    "gpt2": ("ggml-vocab-gpt-2.gguf", None, "GPT-2 byte-level BPE"),
    "llama3": ("ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.1-8B-Instruct.jinja", "Llama-3 byte-level BPE"),
    "qwen2": ("ggml-vocab-qwen2.gguf", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen2 byte-level BPE, NFC"),
    "phi3": ("ggml-vocab-phi-3.gguf", "microsoft-Phi-3.5-mini-instruct.jinja", "Phi-3 SentencePiece"),
    "llama2": ("ggml-vocab-llama-spm.gguf", None, "Llama-2 / Mistral v3 style SentencePiece"),
    "tekken": (None, "mistralai-Mistral-Nemo-Instruct-2407.jinja", "Mistral Tekken (tiktoken-style BPE)"),
}
# Mistral v3's template: "[INST] user [/INST]" then " answer</s>": a space before the content
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
                    "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def _skip(reason: str):
    pytest.skip(f"real-vocabulary tier: {reason}")


@functools.lru_cache(maxsize=1)
def models_folder() -> str:
    """`vendor/llama.cpp/models` of the llama-cpp-python sdist, downloaded and extracted once."""
    folder = os.path.join(CACHE, "llama-cpp", MODELS)
    if os.path.isdir(os.path.join(folder, "templates")):
        return folder
    os.makedirs(CACHE, exist_ok=True)
    sdist = [f for f in os.listdir(CACHE) if f.startswith("llama_cpp_python-") and f.endswith(".tar.gz")]
    if not sdist:
        _pip_download(LLAMA_CPP, "--no-binary", ":all:")
        sdist = [f for f in os.listdir(CACHE) if f.startswith("llama_cpp_python-") and f.endswith(".tar.gz")]
        if not sdist:
            _skip(f"pip download {LLAMA_CPP} wrote no source distribution into {CACHE}")
    with tarfile.open(os.path.join(CACHE, sorted(sdist)[-1])) as archive:
        members = [m for m in archive.getmembers() if f"/{MODELS}/" in m.name
                   and (m.name.endswith(".gguf") and "/ggml-vocab-" in m.name or "/templates/" in m.name)]
        for member in members:
            member.name = member.name[member.name.index(MODELS):]
        # the "data" filter refuses links and paths out of the folder (Python 3.10.12+ / 3.11.4+)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(os.path.join(CACHE, "llama-cpp"), members=members, **safe)
    return folder


def template(file: str) -> str:
    with open(os.path.join(models_folder(), "templates", file), encoding="utf-8") as f:
        return f.read()


def _pip_download(requirement: str, *options: str) -> None:
    os.makedirs(CACHE, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *options, requirement, "-d", CACHE],
                       check=True, capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as error:
        # pip's last lines say why (its first ones are warnings about the index)
        stderr = (getattr(error, "stderr", None) or b"").decode("utf-8", "replace").strip().splitlines()
        why = " / ".join(stderr[-2:]) if stderr else str(error)
        _skip(f"cannot fetch {requirement} with pip download ({type(error).__name__}: {why[-300:]})")


def tekken_file() -> str:
    """`tekken_240718.json` from the mistral-common wheel, downloaded and extracted once."""
    import zipfile

    path = os.path.join(CACHE, "mistral-common", TEKKEN)
    if os.path.isfile(path):
        return path
    wheels = [f for f in os.listdir(CACHE) if f.startswith("mistral_common-") and f.endswith(".whl")] \
        if os.path.isdir(CACHE) else []
    if not wheels:
        _pip_download(MISTRAL_COMMON)
        wheels = [f for f in os.listdir(CACHE) if f.startswith("mistral_common-") and f.endswith(".whl")]
        if not wheels:
            _skip(f"pip download {MISTRAL_COMMON} wrote no wheel into {CACHE}")
    with zipfile.ZipFile(os.path.join(CACHE, sorted(wheels)[-1])) as wheel:
        wheel.extract(TEKKEN, os.path.join(CACHE, "mistral-common"))
    return path


def tekken_tokenizer(path: str):
    """A fast tokenizer from a Tekken JSON file: byte-level BPE over the first
    `default_vocab_size - default_num_special_tokens` ranks (ids shifted past the
    special tokens), the file's split pattern, merges derived from the ranks."""
    import base64
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    config = data["config"]
    num_special = config["default_num_special_tokens"]
    ranks = {base64.b64decode(v["token_bytes"]): v["rank"]
             for v in data["vocab"][:config["default_vocab_size"] - num_special]}
    byte_encoder = bytes_to_unicode()

    def string(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
    vocab = {token: i for i, token in enumerate(specials)}
    merges = []
    for token, rank in ranks.items():
        vocab[string(token)] = rank + num_special
        splits = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges.extend((rank, a, b, left, right) for a, b, left, right in sorted(splits))
    merges = [(string(m[3]), string(m[4])) for m in sorted(merges)]
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(config["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": specials[3:]})
    return tok


def _nfc(tok) -> None:
    """Qwen2's own tokenizer.json normalizes with NFC; the GGUF conversion drops it."""
    from tokenizers import normalizers

    tok.backend_tokenizer.normalizer = normalizers.NFC()


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
    """The real fast tokenizer `name` (a key of GGUF), with its real chat template where it has one."""
    from transformers import AutoTokenizer

    vocab, chat_template, _ = GGUF[name]
    converted = os.path.join(CACHE, "converted", name)
    if name == "tekken" and not os.path.isfile(os.path.join(converted, "tokenizer.json")):
        tekken_tokenizer(tekken_file()).save_pretrained(converted)
    if not os.path.isfile(os.path.join(converted, "tokenizer.json")):
        models = models_folder()
        try:
            import gguf  # noqa: F401  (transformers reads GGUF files with it)
        except ImportError:
            _skip("the `gguf` package is needed to convert GGUF vocabularies (pip install gguf)")
        try:
            tok = AutoTokenizer.from_pretrained(models, gguf_file=vocab)
        except Exception as error:  # pragma: no cover - depends on the transformers version
            _skip(f"transformers cannot convert {vocab}: {type(error).__name__}: {error!s:.200}")
        if name == "qwen2":  # saved with it, so the folder is Qwen2's tokenizer for any reader
            _nfc(tok)
        tok.save_pretrained(converted)
    tok = AutoTokenizer.from_pretrained(converted)
    if name == "qwen2":  # a folder cached before NFC was saved in it
        _nfc(tok)
    tok.chat_template = template(chat_template) if chat_template else None
    if name == "llama2":
        tok.chat_template = MISTRAL_TEMPLATE
    return tok
