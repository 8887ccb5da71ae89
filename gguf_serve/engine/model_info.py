"""What a loaded model is, as plain data: read once when the engine loads it, handed to routes
(Ollama's /api/show, llama-server's /props) and across the engine-process boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

from gguf_serve.engine.llama_runtime import LlamaModel, file_types


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    name: str  # general.name, or the file's stem
    file_type: str  # llama.cpp's name for the weight type: Q4_K_M, Q8_0, F16 ...
    n_params: int
    size_bytes: int
    n_ctx_train: int
    n_ctx: int  # the longest sequence one request may have here (per slot)
    n_vocab: int
    n_embd: int
    n_slots: int  # chat: parallel sequence slots; embedding/rerank: sequences per decode
    chat_template: str | None
    bos_token: str
    eos_token: str
    # GGUF metadata keys that settings are resolved from (general.sampling.*): key -> value text.
    meta: dict[str, str] = field(default_factory=dict)

    def meta_value(self, key: str) -> str | None:
        return self.meta.get(key)


def file_type_name(model: LlamaModel) -> str:
    raw = model.meta("general.file_type")
    if raw is None or not raw.strip().lstrip("-").isdigit():
        return "unknown"
    value = int(raw) & ~1024  # LLAMA_FTYPE_GUESSED
    names = {v: k for k, v in file_types().items()}
    return names.get(value, str(value))


def model_info(
    model: LlamaModel, n_ctx: int, n_slots: int, chat_template: str | None, meta_keys: tuple[str, ...] = ()
) -> ModelInfo:
    def special(token: int) -> str:
        return model.detokenize([token], special=True) if token >= 0 else ""

    meta = {k: v for k in meta_keys if (v := model.meta(k)) is not None}
    return ModelInfo(
        architecture=model.architecture,
        name=model.meta("general.name") or model.path.stem,
        file_type=file_type_name(model),
        n_params=model.n_params,
        size_bytes=model.size_bytes,
        n_ctx_train=model.n_ctx_train,
        n_ctx=n_ctx,
        n_vocab=model.n_vocab,
        n_embd=model.n_embd,
        n_slots=n_slots,
        chat_template=chat_template,
        bos_token=special(model.bos),
        eos_token=special(model.eos),
        meta=meta,
    )
