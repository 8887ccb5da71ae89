"""Issue 18, "validate before llama.cpp": the static grammar check, the JSON-schema caps,
strict JSON bodies, and the typed request fields, without a server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
from pydantic import ValidationError

from gguf_serve.api.protocol.chat import ChatCompletionRequest
from gguf_serve.api.strict_json import loads_strict
from gguf_serve.engine.chat import grammar_for_json_schema
from gguf_serve.engine.chat_template import CHATML_TEMPLATE, RESERVED_TEMPLATE_KWARGS, ChatTemplate
from gguf_serve.engine.grammar_check import (
    MAX_GRAMMAR_BYTES,
    MAX_SCHEMA_DEPTH,
    GrammarError,
    check_grammar,
    check_json_schema,
)
from gguf_serve.engine.llama_runtime import LlamaModel
from gguf_serve.engine.requests import InvalidRequest, SamplingParams
from gguf_serve.engine.sampling import SamplerChain
from gguf_serve.settings import Limits, ModelSettings
from tests.e2e.server import demo_chat_gguf

MS = ModelSettings(id="c", file="c.gguf")
USER = [{"role": "user", "content": "hi"}]

VALID_GRAMMARS = [
    JSON_GBNF,
    'root ::= ""',
    'root ::= "yes" | "no"',
    'root ::= <[5]> !<[3]> [^a-z] . "x"* [a-]+ ("a" | ) ?',
    'root ::= "a"{2,} "b"{0,3} "c"{4}\n',
    'root ::= (\n  "a"\n  | "b"\n)\n# a comment\nother ::= [\\x41-\\u005A\\U0001F600]\n',
    'root ::= item ("," item)*\nitem ::= [0-9]+',
    'root ::= "é" "日本" [α-ω]',
    "root ::= <hello>",
    'root ::= ("a"{100}){10}',
]

INVALID_GRAMMARS = [
    ("root ::= <[999999]>", "outside the vocabulary"),
    ("root ::= !<[49152]>", "outside the vocabulary"),
    ("root ::= " + "(" * 100000 + '"a"' + ")" * 100000, "nested deeper"),
    ('root ::= "a"{5,2}', "below the minimum"),
    ('root ::= "a"{3000}', "more than 2000 repetitions"),
    ('root ::= "' + "a" * 1000 + '"{2000}', "elements"),
    ('root ::= ("a"{0,100}){0,100}', "too many rules"),
    ('root ::= "a"{0,1999} "b"{0,1999} "c"{0,1999} "d"{0,1999} "e"{0,1999} "f"{0,1999}', "rules"),
    ('root ::= "a"{99999999999999999999}', "too large"),
    ("root ::= x", "not defined"),
    ('x ::= "a"', "no 'root' rule"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\x4"', "hex digits"),
    ('root ::= "a', "end of input"),
    ("root ::= [a-", "end of input"),
    ("root ::= *", "before a repetition"),
    ('root ::= ("a"', "expecting ')'"),
    ('root = "a"', "'::='"),
    ('root ::= "a" )', "newline"),
    ("root ::= <abc", "'>'"),
    ("root ::= !x", "'<' after '!'"),
    ('root ::= "a\x00"', "NUL"),
    ('root ::= "\ud800"', "surrogate"),
    ("root ::= " + '"a" ' * (MAX_GRAMMAR_BYTES // 4), "bytes"),
]


@pytest.mark.parametrize("grammar", VALID_GRAMMARS)
def test_valid_grammars_pass(grammar: str) -> None:
    check_grammar(grammar, 49152)


def test_converter_grammars_pass() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 30}},
            "b": {"type": "integer", "minimum": -5, "maximum": 900},
            "c": {"enum": ["x", "y"]},
            "d": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            "e": {"type": "string", "pattern": "^[a-z]{2,5}$"},
        },
        "required": ["a"],
    }
    check_grammar(json_schema_to_gbnf(json.dumps(schema)), 49152)


@pytest.mark.parametrize(("grammar", "message"), INVALID_GRAMMARS)
def test_invalid_grammars_are_rejected_with_a_reason(grammar: str, message: str) -> None:
    with pytest.raises(GrammarError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_grammar(grammar, 49152)


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    m = LlamaModel(demo_chat_gguf())
    yield m
    m.close()


@pytest.mark.parametrize("grammar", VALID_GRAMMARS[:-2])  # <hello> is not one token here
def test_what_the_check_passes_llama_cpp_parses(model: LlamaModel, grammar: str) -> None:
    chain = SamplerChain(model, SamplingParams(grammar=grammar))
    assert chain.grammar
    chain.free()


def test_the_sampler_chain_turns_a_bad_grammar_into_a_400(model: LlamaModel) -> None:
    with pytest.raises(InvalidRequest, match="outside the vocabulary") as e:
        SamplerChain(model, SamplingParams(grammar=f"root ::= <[{model.n_vocab}]>"))
    assert e.value.param == "grammar" and e.value.status == 400
    SamplerChain(model, SamplingParams(grammar=f"root ::= <[{model.n_vocab - 1}]>")).free()


# --- JSON schemas ---------------------------------------------------------------------------------
def nested(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def test_json_schema_caps() -> None:
    check_json_schema(nested(MAX_SCHEMA_DEPTH // 2))
    with pytest.raises(GrammarError, match="deeper"):
        check_json_schema(nested(MAX_SCHEMA_DEPTH + 1))
    with pytest.raises(GrammarError, match="deeper"):
        check_json_schema(nested(100_000))  # no recursion in the check itself
    with pytest.raises(GrammarError, match="bytes"):
        check_json_schema(
            {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
        )
    with pytest.raises(GrammarError, match="maxLength"):
        check_json_schema({"type": "string", "maxLength": 100_000_000})
    with pytest.raises(GrammarError, match="pattern"):
        check_json_schema({"type": "string", "pattern": "a{100000000}"})


def test_the_engine_checks_json_schemas_before_converting() -> None:
    with pytest.raises(InvalidRequest, match="maxLength") as e:
        grammar_for_json_schema({"type": "string", "maxLength": 100_000_000})
    assert e.value.param == "json_schema"
    assert grammar_for_json_schema({"type": "object"}) == JSON_GBNF  # json_object: any object


# --- request fields ---------------------------------------------------------------------------------
def engine_request(**body: object) -> object:
    return ChatCompletionRequest.model_validate({"messages": USER, **body}).to_engine(MS, Limits())


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema", "json_schema": "notadict"},
        {"type": "json_schema", "json_schema": {"schema": "notadict"}},
        {"type": "xml"},
        "json",
    ],
)
def test_malformed_response_format_is_a_validation_error(fmt: object) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": USER, "response_format": fmt})


def test_response_format_becomes_a_json_schema_for_the_engine() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases: list[tuple[dict[str, object], object]] = [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_object", "schema": schema}, schema),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, schema),
        ({"type": "json_schema", "json_schema": schema}, schema),  # the schema in place of the spec
    ]
    for fmt, expected in cases:
        req = engine_request(response_format=fmt)
        assert req.params.json_schema == expected, fmt  # type: ignore[attr-defined]
        assert req.params.grammar is None  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="must be a JSON schema"):
        engine_request(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(InvalidRequest, match="not both"):
        engine_request(response_format={"type": "json_object"}, grammar='root ::= "a"')


def test_tool_schemas_are_capped() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(MAX_SCHEMA_DEPTH + 5)}}
    with pytest.raises(InvalidRequest, match="deeper") as e:
        engine_request(tools=[tool])
    assert e.value.param == "tools.0.function.parameters"


@pytest.mark.parametrize(
    "calls",
    [
        [{"id": "1", "type": "function", "function": "get_weather"}],
        [{"id": "1", "function": {"arguments": "{}"}}],
        ["notadict"],
        [{"id": "1", "type": "function", "function": {"name": 3}}],
    ],
)
def test_malformed_tool_calls_are_a_validation_error(calls: object) -> None:
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": calls}]
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": messages})


def test_tool_calls_reach_the_template_with_arguments_as_an_object() -> None:
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    req = engine_request(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [call]}])
    out = req.messages[1].tool_calls  # type: ignore[attr-defined]
    assert out == [
        {**call, "function": {"name": "f", "arguments": {"x": 1}}, "name": "f", "arguments": {"x": 1}}
    ]


@pytest.mark.parametrize("key", sorted(RESERVED_TEMPLATE_KWARGS))
def test_reserved_chat_template_kwargs_are_a_400(key: str) -> None:
    with pytest.raises(InvalidRequest, match=key) as e:
        engine_request(chat_template_kwargs={key: []})
    assert e.value.param == "chat_template_kwargs"
    if key not in ("messages", "tools", "add_generation_prompt"):  # render's own parameters
        with pytest.raises(InvalidRequest, match=key):
            ChatTemplate(CHATML_TEMPLATE).render(USER, **{key: []})
    req = engine_request(chat_template_kwargs={"enable_thinking": False})
    assert req.template_kwargs == {"enable_thinking": False}  # type: ignore[attr-defined]


def test_a_template_that_fails_on_client_data_is_a_400() -> None:
    template = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequest, match="chat template failed"):
        template.render([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "body",
    [
        '{"logit_bias": {"1": NaN}}',
        '{"repeat_penalty": Infinity}',
        '{"x": [1, -Infinity]}',
        '{"x": {"y": 1e999}}',
        '{"x": -1e400}',
    ],
)
def test_strict_json_rejects_non_finite_numbers(body: str) -> None:
    with pytest.raises(json.JSONDecodeError, match="not JSON numbers"):
        loads_strict(body.encode())


def test_strict_json_reads_ordinary_json() -> None:
    assert loads_strict(b'{"a": [1, 2.5, -1e300, "NaN", null, true]}') == {
        "a": [1, 2.5, -1e300, "NaN", None, True]
    }
    with pytest.raises(json.JSONDecodeError):
        loads_strict(b'{"a": ')


@pytest.mark.parametrize(
    "field", [{"logit_bias": {"1": "NaN"}}, {"repeat_penalty": "Infinity"}, {"top_p": "nan"}]
)
def test_non_finite_floats_as_strings_are_a_validation_error(field: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": USER, **field})
