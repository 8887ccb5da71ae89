"""The Jinja renderer on a Qwen3-style template (tools, thinking switch, tool responses)."""

from __future__ import annotations

import pytest

from gguf_serve.engine.chat_template import ChatTemplate
from gguf_serve.engine.requests import InvalidRequest

QWEN3_LIKE = """{%- if tools %}<|im_start|>system
# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""


def test_thinking_switch_and_tools_render() -> None:
    t = ChatTemplate(QWEN3_LIKE)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "user", "content": "天气?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
        },
        {"role": "tool", "content": "晴"},
    ]
    out = t.render(msgs, tools=tools, enable_thinking=False)
    assert '"name": "get_weather"' in out and "北京" in out  # tojson keeps unicode
    assert "<tool_response>\n晴\n</tool_response>" in out
    assert out.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not t.render(msgs[:1]).rstrip().endswith("</think>")


def test_raise_exception_becomes_a_400() -> None:
    t = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])
