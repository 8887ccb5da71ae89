from __future__ import annotations

from gguf_serve.engine.gpu_fit import ModelFootprint, fit_layers

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
