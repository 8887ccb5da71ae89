"""The Qwen3 prompts, pinned against the text of the model cards (Qwen/Qwen3-Reranker-4B,
Qwen/Qwen3-Embedding-4B, "Usage" with transformers) and llama.cpp's converter."""

from __future__ import annotations

from gguf_serve.convert.architectures import QWEN3_RERANK_TEMPLATE
from gguf_serve.engine.qwen3_prompts import (
    EMBED_QUERY_FORMAT,
    RERANK_INSTRUCTION,
    RERANK_PROMPT,
    fill,
    rerank_template,
)
from gguf_serve.settings import ModelSettings

# Copied from the Qwen3-Reranker model card, character for character.
CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def card_format_instruction(instruction: str | None, query: str, doc: str) -> str:
    if instruction is None:
        instruction = CARD_DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


def test_rerank_prompt_is_the_model_cards() -> None:
    q, d = "What is the capital of China?", "The capital of China is Beijing."
    card = CARD_PREFIX + card_format_instruction(None, q, d) + CARD_SUFFIX
    assert fill(RERANK_PROMPT, instruction=RERANK_INSTRUCTION, query=q, document=d) == card
    custom = CARD_PREFIX + card_format_instruction("Find code", q, d) + CARD_SUFFIX
    assert fill(rerank_template("Find code"), query=q, document=d) == custom


def test_one_default_instruction_everywhere() -> None:
    assert RERANK_INSTRUCTION == CARD_DEFAULT_INSTRUCTION
    assert ModelSettings(id="r", role="rerank", file="x").rerank_instruction == CARD_DEFAULT_INSTRUCTION


def test_gguf_rerank_template_is_llama_cpps() -> None:
    # convert_hf_to_gguf.py (Qwen3Model, is_rerank) stores this exact template.
    llama_cpp = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer the "
        "query\n<Query>: {query}\n<Document>: {document}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert QWEN3_RERANK_TEMPLATE == rerank_template() == llama_cpp


def test_fill_never_rereads_user_text() -> None:
    out = fill(RERANK_PROMPT, instruction="{query}", query="{document}", document="x")
    assert "<Instruct>: {query}\n<Query>: {document}\n<Document>: x" in out


def test_embedding_query_format_is_the_model_cards() -> None:
    # Qwen3-Embedding card: f'Instruct: {task_description}\nQuery:{query}'
    task, query = "Given a web search query, retrieve relevant passages that answer the query", "hi"
    assert EMBED_QUERY_FORMAT.format(task=task, text=query) == f"Instruct: {task}\nQuery:{query}"
