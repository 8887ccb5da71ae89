from __future__ import annotations

from pathlib import Path

import pytest

from gguf_serve.settings import ModelSettings, SettingsError, load_settings

PROFILE = """
port = 9001
host = "127.0.0.1"
[[models]]
id = "m"
file = "m.gguf"
n_ctx = 1024
[limits]
max_queue = 3
"""


@pytest.fixture
def profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for k in list(__import__("os").environ):
        if k.startswith("GGUF_SERVE_"):
            monkeypatch.delenv(k)
    p = tmp_path / "p.toml"
    p.write_text(PROFILE)
    return p


def test_profile_over_defaults(profile: Path) -> None:
    s = load_settings(str(profile))
    assert s.port == 9001 and s.limits.max_queue == 3 and s.models[0].n_ctx == 1024
    assert s.models[0].parallel == 4  # default


def test_dotenv_over_profile_env_over_dotenv_cli_over_env(
    profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (profile.parent / ".env").write_text("GGUF_SERVE_PORT=9002\nGGUF_SERVE_LIMITS__MAX_QUEUE=4\n")
    s = load_settings(str(profile))
    assert s.port == 9002 and s.limits.max_queue == 4
    monkeypatch.setenv("GGUF_SERVE_PORT", "9003")
    assert load_settings(str(profile)).port == 9003
    assert load_settings(str(profile), port=9004).port == 9004


def test_api_keys_comma_separated_and_masked(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUF_SERVE_API_KEYS", "k1, k2")
    s = load_settings(str(profile))
    assert s.all_api_keys() == ["k1", "k2"]
    assert s.masked_dump()["api_keys"] == ["***", "***"]
    assert "k1" not in repr(s)
    monkeypatch.setenv("GGUF_SERVE_API_KEYS", '["k3", "k4"]')
    assert load_settings(str(profile)).all_api_keys() == ["k3", "k4"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ('[[models]]\nid = "m2"\nfile = "x"\nn_ctx = "big"\n', "models.1.n_ctx"),
        ('[[models]]\nid = "m"\nfile = "x"\n', "used by both"),
        ('[[models]]\nid = "e"\nfile = "x"\nn_batch = 8\nn_ubatch = 16\n', "n_ubatch"),
        ('[[models]]\nid = "r"\nrole = "rerank"\nfile = "x"\nscorer = "embedding"\n', "embedding_model"),
        ('[[models]]\nid = "q"\nfile = "x"\nsame_weights_as = "zz"\n', "names no model"),
        ('[[models]]\nid = "q"\nfile = "x"\nunknown_knob = 1\n', "unknown_knob"),
    ],
)
def test_wrong_setting_is_one_clear_message(profile: Path, extra: str, needle: str) -> None:
    profile.write_text(PROFILE + extra)
    with pytest.raises(SettingsError) as e:
        load_settings(str(profile))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(profile) in msg


@pytest.mark.parametrize(
    ("before", "after", "needle"),
    [
        # A misspelt top-level key used to load silently: this one served with no API keys.
        ('api_key_fil = "/etc/gguf-serve/keys"\n', "", "api_key_fil (did you mean api_key_file?)"),
        ("", "max_queu = 4\n", "limits.max_queu (did you mean max_queue?)"),  # lands in [limits]
        ("", '[[models]]\nid = "q"\nfile = "x"\nkeep_alvie = 3\n', "keep_alvie (did you mean keep_alive?)"),
        ("", '[[models]]\nid = "q"\nfile = "x"\n[models.sampling]\ntemprature = 0\n', "temperature?"),
    ],
)
def test_unknown_key_names_the_nearest_valid_one(profile: Path, before: str, after: str, needle: str) -> None:
    profile.write_text(before + PROFILE + after)
    with pytest.raises(SettingsError) as e:
        load_settings(str(profile))
    msg = str(e.value)
    assert msg.startswith("unknown setting ") and needle in msg and "\n" not in msg and str(profile) in msg


def test_unknown_environment_variable_is_an_error(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUF_SERVE_API_KEY_FIL", "/etc/keys")
    with pytest.raises(SettingsError) as e:
        load_settings(str(profile))
    assert str(e.value) == (
        "unknown setting GGUF_SERVE_API_KEY_FIL in the environment (did you mean GGUF_SERVE_API_KEY_FILE?)"
    )
    monkeypatch.delenv("GGUF_SERVE_API_KEY_FIL")
    monkeypatch.setenv("GGUF_SERVE_LIMITS__MAX_QUEU", "3")
    with pytest.raises(SettingsError, match=r"unknown setting limits\.max_queu \(did you mean max_queue\?\)"):
        load_settings(str(profile))
    monkeypatch.delenv("GGUF_SERVE_LIMITS__MAX_QUEU")
    # The chat client's key and the build's wheel cache are no server settings, but known names.
    monkeypatch.setenv("GGUF_SERVE_API_KEY", "k")
    monkeypatch.setenv("GGUF_SERVE_WHEEL_CACHE", "/tmp/wheels")
    assert load_settings(str(profile)).api_keys == []


def test_unknown_dotenv_key_is_an_error_other_programs_keys_are_not(profile: Path) -> None:
    dotenv = profile.parent / ".env"
    dotenv.write_text("PATH_OF_SOMETHING_ELSE=1\nGGUF_SERVE_PORT=9005\n")
    assert load_settings(str(profile)).port == 9005
    dotenv.write_text("GGUF_SERVE_PROT=9005\n")
    with pytest.raises(SettingsError) as e:
        load_settings(str(profile))
    assert "GGUF_SERVE_PROT" in str(e.value) and "did you mean GGUF_SERVE_PORT?" in str(e.value)
    assert str(dotenv) in str(e.value)


def test_file_is_needed_only_by_models_with_their_own_weights() -> None:
    ModelSettings(id="r", role="rerank", scorer="embedding", embedding_model="e")
    ModelSettings(id="q", role="embedding", same_weights_as="e")
    with pytest.raises(ValueError, match="file is required"):
        ModelSettings(id="c", role="chat")


def test_unknown_profile_lists_choices() -> None:
    with pytest.raises(SettingsError, match="choose one of"):
        load_settings("no-such-profile")


def test_shipped_profiles_parse() -> None:
    for name in ("demo", "cpu", "cuda"):
        s = load_settings(name)
        assert s.models and {m.role for m in s.models} == {"chat", "embedding", "rerank"}


def test_n_ubatch_defaults_per_role() -> None:
    # chat: llama.cpp's physical batch, 512 unless the logical batch is smaller
    assert ModelSettings(id="c", file="x", n_batch=2048).ubatch == 512
    assert ModelSettings(id="c", file="x", n_batch=256).ubatch == 256
    # embedding/rerank: tokens packed into one decode, the whole n_batch unless set lower
    assert ModelSettings(id="e", role="embedding", file="x", n_batch=8192).ubatch == 8192
    assert ModelSettings(id="r", role="rerank", file="x", n_batch=8192, n_ubatch=2048).ubatch == 2048


def test_sampling_defaults_are_declared_once() -> None:
    import dataclasses

    from gguf_serve.engine.requests import SamplingParams
    from gguf_serve.settings import SamplingDefaults

    engine_defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    for name, value in SamplingDefaults().model_dump().items():
        if name in engine_defaults:
            assert engine_defaults[name] == value, name


def test_a_model_file_is_built_from_a_recipes_source_and_quant() -> None:
    ms = ModelSettings(id="e", file="x", source="pypi:pkg/model", quant="Q8_0")
    assert (ms.source, ms.quant) == ("pypi:pkg/model", "Q8_0")
    assert ModelSettings(id="e", file="x", source="hf:org/repo").quant == "F16"
    # the recipe's list form, for an entry copied from convert/*.toml
    assert ModelSettings(id="e", file="x", quant=["Q4_K_M"]).quant == "Q4_K_M"


def test_legacy_convert_keys_map_with_a_warning(profile: Path, caplog: pytest.LogCaptureFixture) -> None:
    profile.write_text(
        PROFILE + '[[models]]\nid = "e"\nfile = "x"\nconvert_from = "pypi:pkg/model"\nconvert_quant = "F32"\n'
    )
    with caplog.at_level("WARNING", logger="gguf_serve.settings"):
        ms = load_settings(str(profile)).models[1]
    assert (ms.source, ms.quant) == ("pypi:pkg/model", "F32")
    warned = [r.getMessage() for r in caplog.records]
    assert any("convert_from" in w and "source" in w for w in warned)
    assert any("convert_quant" in w and "quant" in w for w in warned)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ('source = "pypi:a/b"\nconvert_from = "pypi:a/b"\n', "keep only source"),
        ('quant = "F32"\nconvert_quant = "F32"\n', "keep only quant"),
        ('quant = ["Q8_0", "Q4_K_M"]\n', "the one type"),
    ],
)
def test_convert_keys_that_contradict_are_errors(profile: Path, extra: str, needle: str) -> None:
    profile.write_text(PROFILE + '[[models]]\nid = "e"\nfile = "x"\n' + extra)
    with pytest.raises(SettingsError) as e:
        load_settings(str(profile))
    msg = str(e.value)
    assert msg.startswith("invalid setting models.1") and needle in msg and "\n" not in msg


def test_a_near_miss_of_a_renamed_key_names_its_new_name(profile: Path) -> None:
    profile.write_text(PROFILE + '[[models]]\nid = "e"\nfile = "x"\nconvert_fro = "pypi:a/b"\n')
    with pytest.raises(SettingsError, match=r"convert_fro \(did you mean source\?\)"):
        load_settings(str(profile))


@pytest.mark.parametrize("name", ["demo", "cpu", "cuda"])
def test_every_profile_bounds_a_generation_by_default(name: str) -> None:
    """Issue 18: a request without max_tokens (RAGFlow's) stops at the profile's cap, not at a
    full context; a client's explicit max_tokens still wins, up to the context."""
    from gguf_serve.api.protocol.chat import ChatCompletionRequest

    settings = load_settings(name)
    chats = [m for m in settings.models if m.role == "chat"]
    assert chats
    for ms in chats:
        cap = ms.sampling.max_tokens
        assert cap is not None and 256 <= cap < (ms.n_ctx or 1 << 30), (ms.id, cap)
        body = {"messages": [{"role": "user", "content": "hi"}]}
        req = ChatCompletionRequest.model_validate(body).to_engine(ms, settings.limits)
        assert req.params.max_tokens == cap
        more = cap * 2
        req = ChatCompletionRequest.model_validate({**body, "max_tokens": more}).to_engine(
            ms, settings.limits
        )
        assert req.params.max_tokens == more
        req = ChatCompletionRequest.model_validate({**body, "max_completion_tokens": 7}).to_engine(
            ms, settings.limits
        )
        assert req.params.max_tokens == 7


def test_slots_endpoint_is_off_by_default_and_set_like_any_setting(
    profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(str(profile)).slots_endpoint is False
    monkeypatch.setenv("GGUF_SERVE_SLOTS_ENDPOINT", "true")
    assert load_settings(str(profile)).slots_endpoint is True
    assert load_settings(str(profile), slots_endpoint=False).slots_endpoint is False
