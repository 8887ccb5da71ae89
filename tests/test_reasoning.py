from __future__ import annotations

import pytest

from gguf_serve.engine.chat import ChatStream
from gguf_serve.engine.reasoning import ReasoningParser


def run(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    steps = [parser.feed(p) for p in pieces] + [parser.flush()]
    return "".join(r for r, _ in steps), "".join(c for _, c in steps), steps


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
def test_think_block_is_reasoning_in_any_split(split: int) -> None:
    text = "<think>\nLet me add 2 and 2.\n</think>\n\nThe answer is 4."
    pieces = [text[i : i + split] for i in range(0, len(text), split)]
    reasoning, content, steps = run(ReasoningParser(), pieces)
    assert reasoning == "\nLet me add 2 and 2.\n"
    assert content == "The answer is 4."
    assert len(steps) == len(pieces) + 1


def test_reasoning_and_content_never_share_a_delta() -> None:
    stream = ChatStream(None, ReasoningParser(), None)  # type: ignore[arg-type]
    deltas = stream._split("<think>plan</think>\n\nanswer") + stream._split("", final=True)
    assert [(d.reasoning, d.content) for d in deltas] == [("plan", ""), ("", "answer")]


def test_template_opened_think_in_prompt() -> None:
    # Thinking-2507 templates end the prompt with "<think>\n": output holds only </think>.
    reasoning, content, _ = run(ReasoningParser(in_reasoning=True), ["Hmm, ", "easy.</th", "ink>\n\nYes."])
    assert reasoning == "Hmm, easy."
    assert content == "Yes."


def test_empty_think_of_disabled_thinking() -> None:
    reasoning, content, _ = run(ReasoningParser(), ["<think>\n\n</think>\n\n", "Hello!"])
    assert reasoning.strip() == ""
    assert content == "Hello!"


def test_no_think_is_all_content_and_lookalikes_survive() -> None:
    reasoning, content, _ = run(ReasoningParser(), ["  <thi", "s is not a tag> ok"])
    assert reasoning == ""
    assert content == "  <this is not a tag> ok"


def test_unterminated_think_is_reasoning() -> None:
    reasoning, content, _ = run(ReasoningParser(), ["<think>still thinking when max_tokens hit"])
    assert reasoning == "still thinking when max_tokens hit" and content == ""
