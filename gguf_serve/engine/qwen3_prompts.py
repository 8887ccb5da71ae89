"""The prompts Qwen3's retrieval models were trained with, as their model cards give them.

One copy: the reranker scorers, the converter (which stores the rerank prompt in the GGUF,
as llama.cpp's converter does), the settings' default instruction and the embedder all
read them from here. tests/test_qwen3_prompts.py pins them against the model cards' text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Qwen3-Reranker: the default task, and the prompt around one (query, document) pair.
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_PROMPT = (
    RERANK_PREFIX + "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}" + RERANK_SUFFIX
)

# Qwen3-Embedding: queries carry the task; documents are embedded as they are.
EMBED_QUERY_FORMAT = "Instruct: {task}\nQuery:{text}"


def rerank_template(instruction: str = RERANK_INSTRUCTION) -> str:
    """The rerank prompt with the instruction written in and {query}, {document} left to fill:
    what a converted Qwen3-Reranker GGUF carries as its "rerank" chat template."""
    head, tail = RERANK_PROMPT.split("{instruction}")
    return head + instruction + tail


def fill(template: str, **fields: str) -> str:
    """{name} fields filled in one pass, so braces in a query or document are never re-read."""
    return "".join(text for text, _ in fill_runs(template, (), fields))


def fill_runs(template: str, specials: Sequence[str], fields: Mapping[str, str]) -> list[tuple[str, bool]]:
    """`fill`, cut into runs of (text, is_control): each of `specials` that the template itself
    holds (not the text filled in) is a run of its own, marked True; the rest is plain text."""
    keys = {"{" + k + "}": v for k, v in fields.items()}
    runs: list[tuple[str, bool]] = []
    text: list[str] = []
    i = 0
    while i < len(template):
        for key, value in keys.items():
            if template.startswith(key, i):
                text.append(value)
                i += len(key)
                break
        else:
            sp = next((sp for sp in specials if template.startswith(sp, i)), None)
            if sp is None:
                text.append(template[i])
                i += 1
            else:
                runs += [("".join(text), False), (sp, True)]
                text = []
                i += len(sp)
    runs.append(("".join(text), False))
    return runs
