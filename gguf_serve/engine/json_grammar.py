"""JSON schema -> GBNF through llama-cpp-python's converter, with its string rule mended."""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

# The converter in llama-cpp-python 0.3.36 lets every character but `"` and `\` into a string
# (`char ::= [^"\\] | ...`). JSON forbids raw control characters there, so a model that wrote a
# newline inside a string gave invalid JSON under an "enforced" schema. llama.cpp's own
# converter and JSON_GBNF exclude them; so does this.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def json_schema_gbnf(schema: dict[str, Any]) -> str:
    return json_schema_to_gbnf(json.dumps(schema)).replace(_LOOSE_CHAR, _JSON_CHAR)
