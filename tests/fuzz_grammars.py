"""Hypothesis strategies for hostile-but-plausible GBNF: what a buggy client or an attacker
sends in `grammar`. Mostly well-formed grammars (so they reach llama.cpp's sampler, not just
its parser), with the shapes that broke it or could: deep nesting, huge and inverted
repetitions, token references in and out of the vocabulary, empty alternatives, left
recursion, undefined rules, NUL and other odd characters, and plain mutations of all of it."""

from __future__ import annotations

from hypothesis import strategies as st

# SmolLM2's vocabulary has 49152 tokens; ids around it and far outside it.
TOKEN_IDS = st.one_of(
    st.integers(0, 49151),
    st.sampled_from([0, 1, 2, 49151, 49152, 49153, 65535, 999999, 2**31 - 1, 2**32 - 1, 2**32, 10**20]),
)
NAMES_LIST = ["root", "a", "b", "item", "value", "ws", "x-y", "r0", "undefined-rule"]
NAMES = st.sampled_from(NAMES_LIST)

_CHARS = st.one_of(
    st.characters(codec="utf-8", exclude_characters='"\\\n\r\x00'),
    st.sampled_from(["\\n", "\\t", "\\\\", '\\"', "\\x00", "\\x41", "\\u00e9", "\\U0001F600", "\\q", "\\x4"]),
)


def literal() -> st.SearchStrategy[str]:
    return st.lists(_CHARS, max_size=12).map(lambda cs: '"' + "".join(cs) + '"')


def char_class() -> st.SearchStrategy[str]:
    item = st.one_of(
        _CHARS.filter(lambda c: c not in "]-^"),
        st.tuples(st.sampled_from("aAz0"), st.sampled_from("zZa9")).map(lambda t: f"{t[0]}-{t[1]}"),
    )
    return st.tuples(st.booleans(), st.lists(item, max_size=6)).map(
        lambda t: "[" + ("^" if t[0] else "") + "".join(t[1]) + "]"
    )


def token_ref() -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(st.booleans(), TOKEN_IDS).map(lambda t: ("!" if t[0] else "") + f"<[{t[1]}]>"),
        st.sampled_from(["<|im_end|>", "<|im_start|>", "<hello>", "<>", "<[]>", "<[12", "!<x>", "<think>"]),
    )


def repetition() -> st.SearchStrategy[str]:
    small = st.integers(0, 5)
    n = st.one_of(small, small, small, st.sampled_from([100, 1999, 2000, 2001, 10**6, 10**19]))
    return st.one_of(
        st.sampled_from(["*", "+", "?", ""]),
        n.map(lambda m: f"{{{m}}}"),
        n.map(lambda m: f"{{{m},}}"),
        st.tuples(n, n).map(lambda t: f"{{{t[0]},{t[1]}}}"),
    )


def atom(depth: int) -> st.SearchStrategy[str]:
    base = st.one_of(literal(), char_class(), token_ref(), NAMES, st.just("."))
    if depth <= 0:
        return base
    return st.one_of(
        base,
        st.builds(
            lambda alts: "(" + " | ".join(alts) + ")", st.lists(sequence(depth - 1), min_size=1, max_size=3)
        ),
    )


def sequence(depth: int) -> st.SearchStrategy[str]:
    item = st.tuples(atom(depth), repetition()).map(lambda t: t[0] + t[1])
    return st.lists(item, max_size=4).map(" ".join)


def rule(name: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(name, st.lists(sequence(2), min_size=1, max_size=3)).map(
        lambda t: f"{t[0]} ::= " + " | ".join(t[1])
    )


def deep_nesting() -> st.SearchStrategy[str]:
    return st.tuples(st.sampled_from([10, 63, 64, 65, 200, 5000, 100_000]), st.booleans()).map(
        lambda t: "root ::= " + "(" * t[0] + '"a"' + (")" * t[0] if t[1] else "")
    )


def huge() -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            'root ::= "' + "a" * 1000 + '"{2000}',
            'root ::= ("a"{0,1999}){0,1999}',
            "root ::= " + " ".join(f'"a"{{0,{i}}}' for i in range(1, 200)),
            "root ::= " + " | ".join(f'"{i}"' for i in range(5000)),
            "\n".join(f"r{i} ::= r{i + 1}" for i in range(20000)) + '\nr20000 ::= "a"\nroot ::= r0',
            "root ::= " + '"a" ' * 70000,
        ]
    )


def classic() -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            "root ::= <[999999]>",
            'root ::= "a"{5,2}',
            'root ::= "\\x00"',
            'root ::= "a" "\\x00"',
            "root ::= root",
            'root ::= root "a" | "b"',
            'root ::= a\na ::= b\nb ::= a "x"',
            "root ::= ",
            "root ::= |",
            'root ::= "" | ""',
            "root ::= <[2]>",  # an end-of-generation token, required
            "root ::= !<[2]>*",
            "root ::= [^\\x00-\\U0010FFFF]",
            'root ::= [\\U0010FFFF] "a"',
        ]
    )


def mutate(g: str) -> st.SearchStrategy[str]:
    """Insert, delete or duplicate a slice of a grammar."""
    if not g:
        return st.just(g)
    i = st.integers(0, len(g))
    junk = st.sampled_from(
        ['"', "(", ")", "[", "]", "|", "*", "{", "}", "<", ">", "::=", "\n", "\\", "\x00", "#"]
    )
    return st.one_of(
        st.tuples(i, junk).map(lambda t: g[: t[0]] + t[1] + g[t[0] :]),
        st.tuples(i, i).map(lambda t: g[: min(t)] + g[max(t) :]),
        st.tuples(i, i).map(lambda t: g[: max(t)] + g[min(t) : max(t)] + g[max(t) :]),
    )


def _fallbacks(root: str, rules: list[str]) -> list[str]:
    """Definitions for the names no rule defined, so that more grammars reach the sampler."""
    defined = {"root", *(r.split(" ::= ", 1)[0] for r in rules)}
    return [f'{n} ::= "{n[0]}"' for n in NAMES_LIST if n not in defined and n != "undefined-rule"]


def grammars() -> st.SearchStrategy[str]:
    plain = st.tuples(rule(st.just("root")), st.lists(rule(NAMES), max_size=3), st.booleans()).map(
        lambda t: "\n".join([t[0], *t[1], *(_fallbacks(t[0], t[1]) if t[2] else [])])
    )
    some = st.one_of(plain, plain, plain, classic(), deep_nesting(), huge())
    return st.one_of(some, some.flatmap(mutate))
