from __future__ import annotations

from gguf_serve.engine.text_stream import StopTextStream


def test_never_emits_partial_utf8() -> None:
    s = StopTextStream([])
    data = "你好🎉".encode()
    out = [s.feed(data[i : i + 1]) for i in range(len(data))]
    assert all("\ufffd" not in o for o in out)
    assert "".join(out) + s.flush() == "你好🎉"


def test_stop_string_across_tokens_is_cut_and_held_back() -> None:
    s = StopTextStream(["END"])
    assert s.feed(b"hello E") == "hello "  # "E" might start END: held
    assert s.feed(b"N") == ""
    assert s.feed(b"D and more") == ""
    assert s.stopped


def test_held_text_is_released_when_it_cannot_be_a_stop() -> None:
    s = StopTextStream(["END"])
    assert s.feed(b"E") == ""
    assert s.feed(b"x") == "Ex"
    assert not s.stopped
    assert s.feed(b"EN") == ""
    assert s.flush() == "EN"
