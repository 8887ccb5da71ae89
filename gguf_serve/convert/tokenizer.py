"""Export a Hugging Face `tokenizer.json` to GGUF tokenizer metadata, without transformers.

Mirrors what llama.cpp's convert_hf_to_gguf.py writes (get_vocab_base, _set_vocab_gpt2,
BertModel.set_vocab): the token list padded to the model's vocab size, token types
(normal, control, user-defined, unused), merges, special token ids, add_bos/add_eos and
the chat template (gguf.SpecialVocab reads those), and the pre-tokenizer name llama.cpp
selects its splitting regex by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Tokenizer

from gguf_serve.convert.errors import ConvertError

# The probe text llama.cpp hashes the tokenization of to recognise a pre-tokenizer
# (convert_hf_to_gguf.py, get_vocab_base_pre).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated)"
    " ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～"
    " ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there,"
    " 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# Hashes of real tokenizers (from llama.cpp's table) for the families this project converts.
_KNOWN_PRE: dict[str, str] = {
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3(-Embedding)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",  # BERT uncased
}

_QWEN2_DIGITS = r"\p{N}|"
_LLAMA3_DIGITS = r"\p{N}{1,3}"


@dataclass
class Vocab:
    """What the GGUF tokenizer section is made of."""

    model: str  # "gpt2" (byte-level BPE) or "bert" (WordPiece)
    pre: str
    tokens: list[str]
    toktypes: list[int]
    special: gguf.SpecialVocab
    extra: dict[str, Any] = field(default_factory=dict)

    def token_id(self, text: str) -> int | None:
        try:
            return self.tokens.index(text)
        except ValueError:
            return None


def _looks_special(token: str) -> bool:
    # Same rule as llama.cpp's does_token_look_special: some added tokens that act as
    # control tokens are not flagged special in tokenizer.json.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _structural_pre(tok_json: dict[str, Any]) -> str | None:
    """Name the pre-tokenizer from its definition when the probe hash is not a known one
    (a fine-tuned or small test tokenizer that reuses a family's splitting rules)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    kinds = [p.get("type") for p in parts]
    if any(_LLAMA3_DIGITS in r for r in regexes):
        return "llama-bpe"
    if any(_QWEN2_DIGITS in r and r"[^\r\n\p{L}\p{N}]?\p{L}+" in r for r in regexes):
        return "qwen2"
    if "Digits" in kinds and "ByteLevel" in kinds:
        digits = next(p for p in parts if p.get("type") == "Digits")
        if digits.get("individual_digits"):
            return "smollm"
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    return None


def pre_tokenizer_name(model_dir: Path, tok: Tokenizer, tok_json: dict[str, Any], model: str) -> str:
    ids = tok.encode(_CHKTXT).ids
    name = _KNOWN_PRE.get(sha256(str(ids).encode()).hexdigest())
    if name is not None:
        return name
    if model == "bert":
        return "default"  # llama.cpp's WordPiece tokenizer ignores the name
    name = _structural_pre(tok_json)
    if name is None:
        raise ConvertError(
            f"{model_dir}/tokenizer.json: BPE pre-tokenizer not recognised "
            "(supported: qwen2, llama-bpe, smollm, gpt-2 splitting rules)"
        )
    return name


def _byte_level_post_processor(special: gguf.SpecialVocab, tok_json: dict[str, Any]) -> None:
    """A ByteLevel post-processor adds no BOS/EOS: say so explicitly, as llama.cpp's gguf-py
    does (tokenizer.ggml.add_eos_token = false for Qwen3 chat and reranker tokenizers)."""
    post = tok_json.get("post_processor") or {}
    kinds = {proc.get("type") for proc in post.get("processors", [post])}
    if "ByteLevel" not in kinds:
        return
    # llama.cpp reads the post-processor before tokenizer_config.json and lets it win; a
    # template processor beside it (Llama 3) decides what it names.
    alone = not kinds & {"TemplateProcessing", "RobertaProcessing"}
    for typ in ("bos", "eos"):
        if alone or typ not in special.add_special_token:
            special.add_special_token[typ] = False


def load_vocab(model_dir: Path, vocab_size: int | None) -> Vocab:
    """Read tokenizer.json (+ tokenizer_config.json) into the tokens llama.cpp expects."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConvertError(f"{model_dir}: no tokenizer.json (a Hugging Face fast tokenizer is required)")
    try:
        tok_json = json.loads(path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConvertError(f"{path}: cannot read the tokenizer: {e}") from None
    mtype = tok_json.get("model", {}).get("type")
    if mtype == "BPE":
        if "ByteLevel" not in json.dumps(tok_json.get("pre_tokenizer")) + json.dumps(tok_json.get("decoder")):
            raise ConvertError(
                f"{path}: only byte-level BPE tokenizers are supported (this one is not byte-level)"
            )
        model = "gpt2"
    elif mtype == "WordPiece":
        model = "bert"
    else:
        raise ConvertError(
            f"{path}: tokenizer model {mtype!r} is not supported (byte-level BPE or WordPiece)"
        )

    reverse: dict[int, str] = {i: t for t, i in tok_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    n_vocab = vocab_size if vocab_size is not None else max(reverse) + 1
    if max(reverse) >= n_vocab:
        raise ConvertError(f"{path}: token id {max(reverse)} does not fit the model's vocab_size {n_vocab}")

    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            if added[i].get("special") or _looks_special(token):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    pre = pre_tokenizer_name(model_dir, tok, tok_json, model)
    if model == "bert":
        # llama.cpp's WordPiece vocab uses a phantom space instead of the "##" continuation mark
        tokens = [
            t if tt == gguf.TokenType.CONTROL else (t[2:] if t.startswith("##") else "\u2581" + t)
            for t, tt in zip(tokens, toktypes, strict=True)
        ]
        special = gguf.SpecialVocab(model_dir, n_vocab=len(tokens))
    else:
        special = gguf.SpecialVocab(model_dir, load_merges=True)
        if not special.merges:
            raise ConvertError(f"{path}: byte-level BPE tokenizer without merges")
        _byte_level_post_processor(special, tok_json)
    return Vocab(model=model, pre=pre, tokens=tokens, toktypes=toktypes, special=special)


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab, type_vocab_size: int | None = None) -> None:
    if vocab.model == "bert":
        writer.add_token_type_count(type_vocab_size or 1)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.toktypes)
    vocab.special.add_to_gguf(writer, quiet=True)
