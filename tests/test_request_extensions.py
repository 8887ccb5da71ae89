"""llama-server's request extensions at the protocol layer, and settings the engine cannot honour."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_serve.api.protocol.chat import ChatCompletionRequest
from gguf_serve.engine.requests import InvalidRequest
from gguf_serve.settings import Limits, ModelSettings, SettingsError, load_settings

MS = ModelSettings(id="c", file="c.gguf")
USER = [{"role": "user", "content": "hi"}]
PREFILL = [*USER, {"role": "assistant", "content": "Well,"}]


def engine_request(**body: object) -> object:
    return ChatCompletionRequest.model_validate({"messages": USER, **body}).to_engine(MS, Limits())


def test_grammar_and_json_schema_reach_the_engine() -> None:
    req = engine_request(grammar='root ::= "a"')
    assert req.params.grammar == 'root ::= "a"' and req.params.json_schema is None  # type: ignore[attr-defined]
    req = engine_request(json_schema={"type": "object"})
    assert req.params.json_schema == {"type": "object"} and req.params.grammar is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "grammar"),
        ({"json_schema": {"type": "object"}, "response_format": {"type": "json_object"}}, "response_format"),
        ({"continue_final_message": True}, "messages"),
        ({"messages": PREFILL, "continue_final_message": True, "add_generation_prompt": True}, None),
    ],
)
def test_conflicting_fields_are_invalid(body: dict[str, object], param: str | None) -> None:
    with pytest.raises(InvalidRequest) as e:
        engine_request(**body)
    assert e.value.param == (param or "continue_final_message")


def test_prefill_defaults() -> None:
    req = engine_request(messages=PREFILL, continue_final_message=True)
    assert req.continue_final_message and not req.add_generation_prompt  # type: ignore[attr-defined]
    plain = engine_request()
    assert plain.add_generation_prompt and not plain.continue_final_message  # type: ignore[attr-defined]
    assert not engine_request(add_generation_prompt=False).add_generation_prompt  # type: ignore[attr-defined]
    # response_format "text" is no constraint, so it goes with a grammar
    assert engine_request(grammar='root ::= "a"', response_format={"type": "text"})


@pytest.mark.parametrize("pooling", ["none", "rank"])
def test_embedding_pooling_that_gives_no_vector_per_input_is_a_startup_error(
    pooling: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="token-level"):
        ModelSettings(id="e-embed", role="embedding", file="e.gguf", pooling=pooling)  # type: ignore[arg-type]
    monkeypatch.chdir(tmp_path)
    profile = tmp_path / "p.toml"
    profile.write_text(
        f'[[models]]\nid = "e-embed"\nrole = "embedding"\nfile = "e.gguf"\npooling = "{pooling}"\n'
    )
    with pytest.raises(SettingsError, match=r"models\.0") as e:
        load_settings(str(profile))
    assert "\n" not in str(e.value) and "mean" in str(e.value)
    assert ModelSettings(id="e-embed", role="embedding", file="e.gguf", pooling="last").pooling == "last"
