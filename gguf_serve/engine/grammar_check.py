"""A static check of client GBNF before llama.cpp sees it (pure Python, no llama.cpp).

llama.cpp's grammar parser (src/llama-grammar.cpp) turns most syntax errors into a NULL
sampler, but not everything a client can send:

- it recurses once per nesting level of `( ... )` (and its left-recursion check once per
  rule in a chain of leftmost references), so a deep grammar overflows the C stack;
- `S{m,n}` with n < m makes it loop ~2^64 times creating rules (memory runs out);
- repetitions copy their item: `"<long literal>"{2000}` repeated a few times is gigabytes;
- a token reference `<[N]>` outside the vocabulary is accepted, matches no token, and the
  first sampled token then throws inside llama_sampler_sample, which ends the process.

This module walks the grammar the way llama.cpp's parser does, counting the rules and
elements the parse would build, and raises GrammarError (a 400) for anything over the caps
or malformed. What it cannot see statically (a well-formed grammar that admits no token at
some point) is caught at sampling time (engine/sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Caps. JSON-schema grammars of real tool lists are a few KiB, a few hundred rules, nesting < 8.
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GRAMMAR_DEPTH = 64  # nested ( ... ) groups
MAX_GRAMMAR_RULES = 10_000  # named, plus the ones groups and repetitions synthesize
MAX_GRAMMAR_ELEMENTS = 1_000_000  # llama_grammar_element (8 bytes each) after expansion
REPETITION_THRESHOLD = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
_BIG = 10**9  # a number beyond this in a grammar is an error here (llama.cpp: stoull)


class GrammarError(ValueError):
    """The grammar is malformed or over a cap; the message says where."""


def _is_word(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "-" or ("0" <= c <= "9")


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


@dataclass
class _Parser:
    src: str
    n_vocab: int | None
    pos: int = 0
    n_rules: int = 0
    n_elements: int = 0
    defined: set[str] = field(default_factory=set)
    referenced: dict[str, int] = field(default_factory=dict)

    # --- helpers ------------------------------------------------------------------------------
    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.src[i] if i < len(self.src) else ""

    def fail(self, what: str, at: int | None = None) -> GrammarError:
        at = self.pos if at is None else at
        line = self.src.count("\n", 0, at) + 1
        col = at - (self.src.rfind("\n", 0, at) + 1) + 1
        snippet = self.src[at : at + 20].split("\n")[0]
        near = f" near {snippet!r}" if snippet else " at the end"
        return GrammarError(f"invalid grammar: {what} (line {line}, column {col}{near})")

    def space(self, newline_ok: bool) -> None:
        s, i, n = self.src, self.pos, len(self.src)
        while i < n and (s[i] in " \t#" or (newline_ok and s[i] in "\r\n")):
            if s[i] == "#":
                while i < n and s[i] not in "\r\n":
                    i += 1
            else:
                i += 1
        self.pos = i

    def name(self) -> str:
        start = self.pos
        while _is_word(self.peek()):
            self.pos += 1
        if self.pos == start:
            raise self.fail("expecting a rule name")
        return self.src[start : self.pos]

    def integer(self) -> int:
        start = self.pos
        while _is_digit(self.peek()):
            self.pos += 1
        if self.pos == start:
            raise self.fail("expecting an integer")
        digits = self.src[start : self.pos]
        if len(digits) > 10 or int(digits) > _BIG:
            raise self.fail("number too large", start)
        return int(digits)

    def char(self) -> None:
        c = self.peek()
        if c == "":
            raise self.fail("unexpected end of input")
        if c != "\\":
            self.pos += 1
            return
        esc = self.peek(1)
        sizes = {"x": 2, "u": 4, "U": 8}
        if esc in sizes:
            digits = self.src[self.pos + 2 : self.pos + 2 + sizes[esc]]
            if len(digits) != sizes[esc] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"expecting {sizes[esc]} hex digits after \\{esc}")
            self.pos += 2 + sizes[esc]
        elif esc in ("t", "r", "n", "\\", '"', "[", "]", "-"):
            self.pos += 2
        else:
            raise self.fail("unknown escape")

    def add_rule(self) -> None:
        self.n_rules += 1
        if self.n_rules > MAX_GRAMMAR_RULES:
            raise self.fail(f"more than {MAX_GRAMMAR_RULES} rules (with those repetitions generate)")

    def add_elements(self, n: int) -> None:
        self.n_elements += n
        if self.n_elements > MAX_GRAMMAR_ELEMENTS:
            raise self.fail(f"the grammar expands to more than {MAX_GRAMMAR_ELEMENTS} elements (repetitions)")

    # --- the grammar, as llama_grammar_parser reads it ---------------------------------------
    def token(self) -> None:
        start = self.pos
        self.pos += 1  # '<'
        if self.peek() == "[":
            self.pos += 1
            tok = self.integer()
            if self.peek() != "]" or self.peek(1) != ">":
                raise self.fail("expecting ']>' after a token id")
            self.pos += 2
            if self.n_vocab is not None and tok >= self.n_vocab:
                raise self.fail(f"token id {tok} is outside the vocabulary (0..{self.n_vocab - 1})", start)
            return
        end = self.src.find(">", self.pos)
        if end < 0:
            raise self.fail("expecting '>' to close a token", start)
        # `<text>`: llama.cpp tokenizes it and needs exactly one token, else a clean parse error.
        self.pos = end + 1

    def alternates(self, depth: int, nested: bool) -> None:
        size = self.sequence(depth, nested)
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            size += 1 + self.sequence(depth, nested)
        self.add_elements(size + 1)

    def sequence(self, depth: int, nested: bool) -> int:
        """Parse one alternative; returns how many elements it adds to its rule."""
        size = 0
        last_sym_start = 0
        n_prev_rules = 1
        while self.pos < len(self.src):
            c = self.peek()
            if c == '"':
                self.pos += 1
                last_sym_start, n_prev_rules = size, 1
                while self.peek() != '"':
                    self.char()
                    size += 1
                self.pos += 1
                self.space(nested)
            elif c == "[":
                self.pos += 1
                if self.peek() == "^":
                    self.pos += 1
                last_sym_start, n_prev_rules = size, 1
                while self.peek() != "]":
                    self.char()
                    size += 1
                    if self.peek() == "-" and self.peek(1) != "]":
                        if self.peek(1) == "":
                            raise self.fail("unexpected end of input")
                        self.pos += 1
                        self.char()
                        size += 1
                self.pos += 1
                self.space(nested)
            elif c in "<!":
                if c == "!":
                    self.pos += 1
                    if self.peek() != "<":
                        raise self.fail("expecting '<' after '!'")
                self.token()
                last_sym_start, n_prev_rules = size, 1
                size += 1
                self.space(nested)
            elif _is_word(c):
                at = self.pos
                self.referenced.setdefault(self.name(), at)
                self.space(nested)
                last_sym_start, n_prev_rules = size, 1
                size += 1
            elif c == "(":
                if depth + 1 > MAX_GRAMMAR_DEPTH:
                    raise self.fail(f"groups nested deeper than {MAX_GRAMMAR_DEPTH}")
                self.pos += 1
                self.space(True)
                before = self.n_rules
                self.add_rule()
                self.alternates(depth + 1, True)
                n_prev_rules = max(1, self.n_rules - before)
                last_sym_start = size
                size += 1
                if self.peek() != ")":
                    raise self.fail("expecting ')'")
                self.pos += 1
                self.space(nested)
            elif c == ".":
                last_sym_start, n_prev_rules = size, 1
                size += 1
                self.pos += 1
                self.space(nested)
            elif c in "*+?{":
                op_at = self.pos
                self.pos += 1
                self.space(nested)
                if c == "*":
                    lo, hi = 0, None
                elif c == "+":
                    lo, hi = 1, None
                elif c == "?":
                    lo, hi = 0, 1
                else:
                    if not _is_digit(self.peek()):
                        raise self.fail("expecting an integer")
                    lo = self.integer()
                    self.space(nested)
                    hi = lo
                    if self.peek() == ",":
                        self.pos += 1
                        self.space(nested)
                        hi = self.integer() if _is_digit(self.peek()) else None
                        self.space(nested)
                        if self.peek() != "}":
                            raise self.fail("expecting '}'")
                    elif self.peek() != "}":
                        raise self.fail("expecting ',' or '}'")
                    self.pos += 1
                    self.space(nested)
                    if lo > REPETITION_THRESHOLD:
                        raise self.fail(f"more than {REPETITION_THRESHOLD} repetitions", op_at)
                    if hi is not None and hi < lo:
                        raise self.fail(f"repetition {{{lo},{hi}}}: the maximum is below the minimum", op_at)
                    if hi is not None and hi > REPETITION_THRESHOLD:
                        hi = None
                if last_sym_start == size:
                    raise self.fail("expecting an item before a repetition", op_at)
                size, n_prev_rules = self.repeat(size, last_sym_start, n_prev_rules, lo, hi, op_at)
            else:
                break
        return size

    def repeat(
        self, size: int, last_sym_start: int, n_prev_rules: int, lo: int, hi: int | None, at: int
    ) -> tuple[int, int]:
        """llama.cpp's handle_repetitions, counting what it builds: S{m,n} -> m copies of S,
        then n-m optional rules `S' ::= S S'' |`."""
        prev = size - last_sym_start
        total = hi if hi is not None and hi > 0 else (lo if lo > 0 else 1)
        if n_prev_rules * total > REPETITION_THRESHOLD:
            raise self.fail("nested repetitions generate too many rules", at)
        size = last_sym_start if lo == 0 else size + (lo - 1) * prev  # counted with its rule
        n_opt = 1 if hi is None else hi - lo
        for _ in range(n_opt):
            self.add_rule()
        self.add_elements(n_opt * (prev + 3))
        if n_opt > 0:
            size += 1
        return size, n_prev_rules * total

    def rule(self) -> None:
        name = self.name()
        self.space(False)
        if not self.src.startswith("::=", self.pos):
            raise self.fail("expecting '::='")
        self.pos += 3
        self.space(True)
        if name not in self.defined:
            self.defined.add(name)
            self.add_rule()
        self.alternates(0, False)
        c = self.peek()
        if c == "\r":
            self.pos += 2 if self.peek(1) == "\n" else 1
        elif c == "\n":
            self.pos += 1
        elif c:
            raise self.fail("expecting a newline or the end")
        self.space(True)

    def parse(self, root: str) -> None:
        self.space(True)
        while self.pos < len(self.src):
            self.rule()
        for name, at in self.referenced.items():
            if name not in self.defined:
                raise self.fail(f"rule {name!r} is used but not defined", at)
        if root not in self.defined:
            raise GrammarError(f"invalid grammar: no {root!r} rule")


def check_grammar(text: str, n_vocab: int | None = None, root: str = "root") -> None:
    """Raise GrammarError unless llama.cpp can parse `text` safely. `n_vocab`: the model's
    vocabulary size, which every `<[id]>` must be below (None: not checked)."""
    if "\x00" in text:
        raise GrammarError("invalid grammar: it contains a NUL character")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise GrammarError("invalid grammar: it is not valid Unicode (a lone surrogate)") from None
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {size} bytes; the limit is {MAX_GRAMMAR_BYTES}")
    _Parser(text, n_vocab).parse(root)


# --- JSON schemas (response_format, json_schema, tools' parameters) ------------------------------
MAX_SCHEMA_DEPTH = 32  # nested objects/arrays in the schema document
MAX_SCHEMA_BYTES = 64 * 1024  # the schema as compact JSON
# llama.cpp's converter writes a string's or an array's bounds out as that many copies of a
# rule: {"maxLength": 100000000} is an 800 MB grammar built in Python before any check.
MAX_SCHEMA_REPETITION = 10_000
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def check_json_schema(schema: object, what: str = "JSON schema") -> None:
    """Raise GrammarError when a JSON schema is too deep, too big, or asks for repetition
    counts the grammar converter would expand into something huge."""
    import json
    import re

    # Depth first, without recursion (json.dumps of a 100,000-deep document would recurse).
    stack: list[tuple[object, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the {what} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _REPEAT_KEYS and isinstance(value, int | float) and value > MAX_SCHEMA_REPETITION:
                    raise GrammarError(f"the {what}'s {key} is over {MAX_SCHEMA_REPETITION}")
                if key == "pattern" and isinstance(value, str):
                    counts = re.findall(r"\{\s*(\d+)", value) + re.findall(r",\s*(\d+)\s*\}", value)
                    if any(len(c) > 6 or int(c) > MAX_SCHEMA_REPETITION for c in counts):
                        raise GrammarError(
                            f"the {what}'s pattern repeats more than {MAX_SCHEMA_REPETITION} times"
                        )
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False))
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the {what} is not JSON: {e}") from None
    if size > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the {what} is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
