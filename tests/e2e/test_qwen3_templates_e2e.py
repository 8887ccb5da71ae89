"""Qwen3's real chat templates and prompts over HTTP, on the small real-vocabulary checkpoints
that `make convert` built from a ModelScope cache.

The weights are random, so nothing here looks at what the text says. Prompts are checked by
their tokens: a greedy chat answer must be token for token (with the same log-probabilities)
the greedy completion of the token ids that transformers' apply_chat_template renders, and
usage.prompt_tokens must be their number. Embeddings are checked against
sentence-transformers with the model's own query prompt, rerank scores against
transformers computing P(yes) from the Qwen3-Reranker prompt of the model card.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ConvertRun
from tests.e2e.server import ServerProcess
from tests.fixtures import qwen3_checkpoints as qc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

THINK, END_THINK, TOOL_CALL = 151667, 151668, 151657
ENDOFTEXT, IM_END = qc.ENDOFTEXT, qc.IM_END
# Keep greedy answers plain text: no end of turn, no think or tool tags.
PLAIN = {str(t): -100 for t in (ENDOFTEXT, IM_END, THINK, END_THINK, TOOL_CALL)}
TASK = "Given a web search query, retrieve relevant passages that answer the query"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "城市, e.g. Paris"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "system+user": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is retrieval augmented generation? 用中文回答。"},
    ],
    "multi-turn with reasoning": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Tell me a joke about llamas 🦙."},
    ],
    "tool round trip": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
    ],
}


def _gguf(run: ConvertRun, name: str, type_name: str) -> str:
    return str(run.gguf(name, type_name))


@pytest.fixture(scope="module")
def qwen3_server(qwen3_convert: ConvertRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert qwen3_convert.returncode == 0, qwen3_convert.stderr[-2000:]
    run = qwen3_convert
    hybrid = qc.TEMPLATES / "qwen3.jinja"  # Qwen3-14B's template: enable_thinking switches thinking
    profile = f"""
[[models]]
id = "instruct"
file = "{_gguf(run, "Qwen3-4B-Instruct-2507", "Q4_K_M")}"
n_ctx = 2048
parallel = 2

[[models]]
id = "thinking"
file = "{_gguf(run, "Qwen3-4B-Thinking-2507", "Q4_K_M")}"
n_ctx = 2048
parallel = 1

[[models]]
id = "hybrid"
file = "{_gguf(run, "Qwen3-4B-Instruct-2507", "F16")}"
chat_template = "{hybrid}"
n_ctx = 2048
parallel = 1

[[models]]
id = "embed"
role = "embedding"
file = "{_gguf(run, "Qwen3-Embedding-0.6B", "F16")}"
n_ctx = 2048
n_batch = 2048
parallel = 4

[[models]]
id = "embed-query"
role = "embedding"
file = "{_gguf(run, "Qwen3-Embedding-0.6B", "F16")}"
same_weights_as = "embed"
query_instruction = "{TASK}"

[[models]]
id = "rerank"
role = "rerank"
file = "{_gguf(run, "Qwen3-Reranker-0.6B", "F16")}"
n_ctx = 2048
n_batch = 2048
parallel = 4
"""
    path = tmp_path_factory.mktemp("qwen3-e2e") / "qwen3.toml"
    path.write_text(profile, encoding="utf-8")
    server = ServerProcess(str(path))
    try:
        server.wait_ready(timeout=600)
        yield server.base_url
    finally:
        code = server.stop()
        assert code == 0, f"server exited with {code}:\n{server.log_tail()}"


@pytest.fixture(scope="module")
def http(qwen3_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=qwen3_server, timeout=300) as c:
        yield c


def hf_tokenizer(run: ConvertRun, name: str, template: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qc.modelscope_dir(run.cache, qc.MODELS[name].repo)))
    if template is not None:
        tok.chat_template = template.read_text(encoding="utf-8")
    return tok


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as transformers' templates take them (tool arguments as objects)."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def hf_prompt_ids(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    text = tok.apply_chat_template(
        hf_messages(messages), tokenize=False, add_generation_prompt=True, **kwargs
    )
    return list(tok(text, add_special_tokens=False)["input_ids"])


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def greedy_chat(
    http: httpx.Client, model: str, messages: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        **extra,
    }
    return post(http, "/v1/chat/completions", body)


def greedy_completion(http: httpx.Client, model: str, ids: list[int], **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": ids, "temperature": 0, "max_tokens": 8, "logprobs": 0, **extra}
    return post(http, "/v1/completions", body)


def assert_same_prompt(
    http: httpx.Client, model: str, messages: list[dict[str, Any]], ids: list[int], **extra: Any
) -> dict[str, Any]:
    """The server's chat prompt is `ids`: same count, same greedy tokens and log-probabilities."""
    chat = greedy_chat(http, model, messages, logit_bias=PLAIN, **extra)
    done = greedy_completion(http, model, ids, logit_bias=PLAIN)
    assert chat["usage"]["prompt_tokens"] == len(ids) == done["usage"]["prompt_tokens"]
    got = chat["choices"][0]["logprobs"]["content"]
    want = done["choices"][0]["logprobs"]
    assert [t["token"] for t in got] == want["tokens"]
    # The two prefills differ in batch shape (and prefix reuse), so Q4_K sums round apart a little.
    np.testing.assert_allclose([t["logprob"] for t in got], want["token_logprobs"], atol=0.05)
    msg = chat["choices"][0]["message"]
    assert (msg.get("reasoning_content") or "") + (msg["content"] or "") == done["choices"][0]["text"]
    return chat


# --- chat templates ------------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize(
    ("model", "name"), [("instruct", "Qwen3-4B-Instruct-2507"), ("thinking", "Qwen3-4B-Thinking-2507")]
)
def test_chat_prompt_is_apply_chat_template(
    http: httpx.Client, qwen3_convert: ConvertRun, model: str, name: str, conversation: str
) -> None:
    tok = hf_tokenizer(qwen3_convert, name)
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation == "tool round trip" else None
    ids = hf_prompt_ids(tok, messages, tools=tools)
    if model == "thinking":
        assert ids[-2:] == [THINK, 198]  # the template opens <think>\n itself
    extra = {"tools": tools} if tools else {}
    chat = assert_same_prompt(http, model, messages, ids, **extra)
    msg = chat["choices"][0]["message"]
    if model == "thinking":  # no </think> yet: all of it is reasoning, inside the template's <think>
        assert msg["reasoning_content"] and not msg["content"]
    else:
        assert msg["content"] and not msg.get("reasoning_content")


def test_tools_render_and_a_forced_tool_call_comes_back_as_tool_calls(
    http: httpx.Client, qwen3_convert: ConvertRun
) -> None:
    tok = hf_tokenizer(qwen3_convert, "Qwen3-4B-Instruct-2507")
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    ids = hf_prompt_ids(tok, messages, tools=TOOLS)
    assert_same_prompt(http, "instruct", messages, ids, tools=TOOLS)
    call = '<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\"}}\\n</tool_call>'
    r = greedy_chat(http, "instruct", messages, tools=TOOLS, grammar=f'root ::= "{call}"', max_tokens=64)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [got] = choice["message"]["tool_calls"]
    assert got["type"] == "function" and got["function"]["name"] == "get_weather"
    assert json.loads(got["function"]["arguments"]) == {"city": "Paris"}
    assert not choice["message"].get("content")
    assert r["usage"]["prompt_tokens"] == len(ids)


def test_enable_thinking_false_renders_as_transformers(http: httpx.Client, qwen3_convert: ConvertRun) -> None:
    tok = hf_tokenizer(qwen3_convert, "Qwen3-4B-Instruct-2507", template=qc.TEMPLATES / "qwen3.jinja")
    messages = CONVERSATIONS["system+user"]
    on, off = hf_prompt_ids(tok, messages), hf_prompt_ids(tok, messages, enable_thinking=False)
    assert off[: len(on)] == on and tok.decode(off[len(on) :]) == "<think>\n\n</think>\n\n"
    assert_same_prompt(http, "hybrid", messages, on)
    assert_same_prompt(http, "hybrid", messages, off, enable_thinking=False)  # RAGFlow's top-level field
    assert_same_prompt(http, "hybrid", messages, off, chat_template_kwargs={"enable_thinking": False})


def test_thinking_template_splits_reasoning_at_think_close(
    http: httpx.Client, qwen3_convert: ConvertRun
) -> None:
    """Thinking-2507's prompt opens <think>; the answer holds only </think>: the text before it is
    reasoning_content, the rest content, exactly where the raw completion has it."""
    tok = hf_tokenizer(qwen3_convert, "Qwen3-4B-Thinking-2507")
    messages = CONVERSATIONS["system+user"]
    ids = hf_prompt_ids(tok, messages)
    no_eog = {str(ENDOFTEXT): -100, str(IM_END): -100}
    for bias in np.arange(0.0, 16.0, 0.25):  # the least push that makes the model close the block
        raw = greedy_completion(
            http, "thinking", ids, max_tokens=12, logit_bias={**no_eog, str(END_THINK): bias}
        )
        text = raw["choices"][0]["text"]
        if 0 < text.find("</think>") < len(text) - len("</think>"):
            break
    else:
        pytest.fail("no logit bias made the model write </think> mid-answer")
    chat = greedy_chat(
        http, "thinking", messages, max_tokens=12, logit_bias={**no_eog, str(END_THINK): float(bias)}
    )
    msg = chat["choices"][0]["message"]
    before, _, after = text.partition("</think>")
    assert msg["reasoning_content"] == before
    assert msg["content"] == after.lstrip("\n")


# --- embeddings and rerank --------------------------------------------------------------------------


def test_embedding_query_instruction_and_eos_match_sentence_transformers(
    http: httpx.Client, qwen3_convert: ConvertRun
) -> None:
    from sentence_transformers import SentenceTransformer

    folder = qc.modelscope_dir(qwen3_convert.cache, "Qwen/Qwen3-Embedding-0.6B")
    st = SentenceTransformer(str(folder), device="cpu")
    queries = ["What is the capital of China?", "解释一下引力"]
    docs = ["The capital of China is Beijing.", "Gravity is a force that attracts two bodies."]
    want_q = st.encode(queries, prompt_name="query", normalize_embeddings=True)
    want_d = st.encode(docs, normalize_embeddings=True)
    got_q = post(http, "/v1/embeddings", {"model": "embed-query", "input": queries})
    got_d = post(http, "/v1/embeddings", {"model": "embed", "input": docs})
    hf = st.tokenizer
    n_q = sum(len(hf(f"Instruct: {TASK}\nQuery:{q}")["input_ids"]) for q in queries)
    assert got_q["usage"]["prompt_tokens"] == n_q  # instruction + query + <|endoftext|>
    assert hf(queries[0])["input_ids"][-1] == ENDOFTEXT
    for got, want in ((got_q, want_q), (got_d, want_d)):
        vecs = np.array([d["embedding"] for d in got["data"]], dtype=np.float32)
        cos = (vecs * want).sum(1) / np.linalg.norm(vecs, axis=1)
        assert (cos > 0.999).all(), cos


def test_rerank_is_p_yes_of_the_qwen3_reranker_prompt(http: httpx.Client, qwen3_convert: ConvertRun) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = qc.modelscope_dir(qwen3_convert.cache, "Qwen/Qwen3-Reranker-0.6B")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    # The model card's prompt, built the way its example code builds it.
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    query = "What is the capital of China?"
    docs = ["The capital of China is Beijing.", "Gravity is a force.", "北京是中国的首都。"]
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    want = []
    for d in docs:
        ids = tok(prefix + f"<Instruct>: {TASK}\n<Query>: {query}\n<Document>: {d}" + suffix)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        want.append(float(torch.softmax(logits[[yes, no]], 0)[0]))
    r = post(http, "/v1/rerank", {"model": "rerank", "query": query, "documents": docs})
    got = {x["index"]: x["relevance_score"] for x in r["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], want, atol=2e-3)
