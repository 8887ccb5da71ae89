from __future__ import annotations

from gguf_serve.engine.context_size import ContextSize, context_size
from gguf_serve.engine.gpu_fit import ModelFootprint, auto_layers, fit_layers, kv_cache_bytes
from gguf_serve.settings import ModelSettings

GiB = 2**30


def fp() -> ModelFootprint:
    # 40 blocks of 200 MiB, 600 MiB of embeddings/head, KV width 1024 (8 kv heads x 128).
    return ModelFootprint([200 * 2**20] * 40, 600 * 2**20, 1024)


def test_everything_fits_with_room() -> None:
    assert fit_layers(fp(), 8192, "f16", "f16", 80 * GiB, GiB) == 40


def test_partial_fit_counts_kv_per_layer() -> None:
    # KV per layer: 8192 ctx * 1024 * (2 + 2) bytes = 32 MiB; a layer costs 232 MiB.
    free, reserve = 6 * GiB, GiB
    n = fit_layers(fp(), 8192, "f16", "f16", free, reserve)
    assert n == (5 * GiB) // (232 * 2**20)


def test_quantized_kv_fits_more_layers() -> None:
    free = 6 * GiB
    assert fit_layers(fp(), 65536, "q8_0", "q8_0", free, GiB) > fit_layers(
        fp(), 65536, "f16", "f16", free, GiB
    )


def test_head_goes_with_the_last_layer_and_nothing_fits_in_nothing() -> None:
    need_all_but_head = 40 * (200 * 2**20 + 32 * 2**20)
    assert fit_layers(fp(), 8192, "f16", "f16", need_all_but_head + GiB, GiB) == 39
    assert fit_layers(fp(), 8192, "f16", "f16", GiB // 2, GiB) == 0


def qwen3_14b() -> ModelFootprint:
    # Qwen3-14B Q4_K_M: 40 blocks of ~210 MiB, ~1.2 GiB embeddings/head, 8 kv heads x 128, 40,960 trained.
    return ModelFootprint([210 * 2**20] * 40, 1200 * 2**20, 1024, n_ctx_train=40960)


def test_context_size_chat_counts_every_slot_and_zero_means_the_trained_context() -> None:
    ms = ModelSettings(id="c", file="x", n_ctx=0, parallel=4)
    assert context_size(ms, 40960) == ContextSize(n_ctx=4 * 40960, n_ctx_seq=40960, n_batch=512, n_seq_max=4)
    ms = ModelSettings(id="c", file="x", n_ctx=4096, parallel=4)
    assert context_size(ms, 40960).n_ctx == 16384
    assert context_size(ModelSettings(id="c", file="x", n_ctx=0, parallel=2), 0).n_ctx_seq == 4096


def test_context_size_embedding_holds_one_batch_whatever_parallel_is() -> None:
    ms = ModelSettings(id="e", role="embedding", file="x", n_ctx=512, n_batch=512, parallel=16)
    assert context_size(ms, 512) == ContextSize(
        n_ctx=512, n_ctx_seq=512, n_batch=512, n_seq_max=16, express=512
    )
    # never longer than the trained context; a decode always holds one whole sequence
    ms = ModelSettings(id="e", role="embedding", file="x", n_ctx=0, n_batch=256, parallel=8)
    assert context_size(ms, 32768) == ContextSize(
        n_ctx=32768, n_ctx_seq=32768, n_batch=32768, n_seq_max=8, express=256
    )
    ms = ModelSettings(id="r", role="rerank", file="x", n_ctx=8192, n_batch=2048)
    assert context_size(ms, 1024).n_ctx_seq == 1024


def test_pooled_contexts_round_their_decode_to_whole_sequences() -> None:
    # llama.cpp aborts creating a mean-pooling context whose n_ubatch is not a multiple of
    # n_seq_max; the main and the express context both round up, and the KV estimate counts it.
    ms = ModelSettings(
        id="e", role="embedding", file="x", n_ctx=300, n_batch=300, parallel=64, express_tokens=100
    )
    size = context_size(ms, 512)
    assert (size.n_batch, size.n_ctx, size.n_seq_max, size.express) == (320, 320, 64, 128)
    assert size.n_ctx_seq == 300
    assert size.kv_cells == 448
    no_express = ms.model_copy(update={"express_tokens": 0})
    assert context_size(no_express, 512).kv_cells == 320
    assert context_size(ms.model_copy(update={"parallel": 500}), 512).n_seq_max == 64


def test_auto_fit_counts_the_trained_context_for_n_ctx_zero() -> None:
    """Counting 4,096 x parallel for n_ctx = 0 on Qwen3-14B offloaded ~10x too much KV."""
    free = 24 * GiB
    at_4k = auto_layers(qwen3_14b(), ModelSettings(id="c", file="x", n_ctx=4096, parallel=4), free)
    at_train = auto_layers(qwen3_14b(), ModelSettings(id="c", file="x", n_ctx=0, parallel=4), free)
    assert at_4k == 40
    # 4 x 40,960 cells x 1024 x 4 bytes = 640 MiB per layer, + 210 MiB weights: ~27 layers in 22.8 GiB
    reserve = free // 20
    assert at_train == (free - reserve) // (850 * 2**20)
    emb = ModelSettings(id="e", role="embedding", file="x", n_ctx=0, n_batch=512, parallel=64)
    small = ModelFootprint([100 * 2**20] * 36, 300 * 2**20, 1024, n_ctx_train=32768)
    # an embedding model's cache is one batch (32,768 cells), not 64 of them
    assert auto_layers(small, emb, 16 * GiB) == 36


def test_kv_cache_bytes_of_the_cpu_profile_models() -> None:
    # Qwen3-4B: 36 layers, 8 KV heads x 128; the cpu profile's 4 slots of 8192 tokens, f16 K and V.
    qwen3_4b = ModelFootprint([100 * 2**20] * 36, 0, 8 * 128, n_ctx_train=262144)
    chat = ModelSettings(id="c", file="x.gguf", n_ctx=8192, parallel=4)
    assert kv_cache_bytes(qwen3_4b, chat) == 8192 * 4 * 1024 * (2 + 2) * 36  # 4.5 GiB
    q8 = ModelSettings(
        id="c", file="x.gguf", n_ctx=8192, parallel=4, cache_type_k="q8_0", cache_type_v="q8_0"
    )
    assert kv_cache_bytes(qwen3_4b, q8) == int(8192 * 4 * 1024 * (34 / 32) * 2) * 36
    # An embedding model's cache holds one batch, not one per `parallel`, plus the express
    # lane's context (express_tokens: 512 by default).
    qwen3_06b = ModelFootprint([20 * 2**20] * 28, 0, 8 * 128, n_ctx_train=32768)
    emb = ModelSettings(id="e", role="embedding", file="x.gguf", n_ctx=8192, n_batch=8192, parallel=16)
    assert kv_cache_bytes(qwen3_06b, emb) == (8192 + 512) * 1024 * 4 * 28
    no_express = emb.model_copy(update={"express_tokens": 0})
    assert kv_cache_bytes(qwen3_06b, no_express) == 8192 * 1024 * 4 * 28
