"""The ``when:`` guard language: a small, safe expression language for transitions.

Guards are written by flow authors in YAML and evaluated on every turn against a
scope of plain data (collected entities, policy values, ...). They are parsed by
the hand-written tokenizer and recursive-descent parser below into an immutable
tree; nothing ever reaches Python's ``eval``/``compile``, and the evaluator can
only read ``Mapping`` keys, so a guard cannot reach attributes, call arbitrary
code or import anything.

Grammar (EBNF; keywords are case-sensitive, whitespace is space, tab, CR or LF)::

    guard       = or_expr EOF ;
    or_expr     = and_expr { "or" and_expr } ;
    and_expr    = not_expr { "and" not_expr } ;
    not_expr    = "not" not_expr | comparison ;
    comparison  = unary [ comp_op unary ] ;          (* no chaining: a < b < c is an error *)
    comp_op     = "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in" ;
    unary       = "-" unary | primary ;
    primary     = literal | list | call | name | "(" or_expr ")" ;
    list        = "[" [ or_expr { "," or_expr } [ "," ] ] "]" ;
    call        = FUNCTION "(" [ or_expr { "," or_expr } ] ")" ;
    name        = IDENT { "." SEGMENT } ;              (* no spaces around the dots *)
    literal     = NUMBER | STRING | "true" | "false" | "null"
                | "True" | "False" | "None" ;
    IDENT       = letter { letter | digit | "_" } ;   (* ASCII; not a keyword, not a
                                                         Python word such as lambda *)
    SEGMENT     = letter { letter | digit | "_" } ;   (* any word allowed after a dot *)
    NUMBER      = digit { digit } [ "." digit { digit } ] ;
    STRING      = "'" { char | "\\'" | "\\\\" } "'"
                | '"' { char | '\\"' | "\\\\" } '"' ;
    FUNCTION    = "len" | "lower" | "upper" | "defined" ;

Names starting with ``_`` are rejected anywhere in a dotted path, so dunder
tricks cannot even be written. ``defined`` takes a name, not an expression.

Semantics:

* A name resolves by key lookup in the scope and then in nested mappings; a
  missing key, or a dot applied to something that is not a mapping, gives
  ``null`` (so ``order_id != null`` works before the entity is collected).
* Integers parse as ``int``, decimals as ``decimal.Decimal``. ``int``, ``float``
  and ``Decimal`` compare exactly with each other (floats via ``Decimal(str(x))``).
  A string that looks like a decimal number (``"129.00"``) compares numerically
  with a number, because money is stored as strings. Booleans are not numbers.
* ``==``/``!=`` never fail; values of unrelated types are simply unequal.
* ``< <= > >=`` are false when either side is ``null``. Numbers order
  numerically; two strings order numerically when both look like decimal
  numbers (so two money strings never compare as text) and as text otherwise.
  Any other combination raises :class:`~engine.errors.GuardEvaluationError`.
* ``x in y``: ``y`` may be a list (element equality as for ``==``), a string
  (substring; ``x`` must be a string), a mapping (key membership) or ``null``
  (treated as empty).
* ``and``/``or`` short-circuit and give booleans; ``not`` and the guard's final
  value use Python truthiness.
* ``len``/``lower``/``upper`` return ``null`` for ``null``; ``defined(x)`` is
  ``x != null``.

Limits against hostile input: at most :data:`MAX_SOURCE_LENGTH` characters and
:data:`MAX_DEPTH` levels of nesting (parentheses, lists, calls, ``not``, unary
minus).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, Final

from engine.errors import GuardEvaluationError, GuardSyntaxError

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_SOURCE_LENGTH",
    "Function",
    "Guard",
    "parse_guard",
]

MAX_SOURCE_LENGTH: Final = 1000
MAX_DEPTH: Final = 32

# Words that mean something in Python but not here: naming them gives a clear
# message instead of a confusing "unexpected name" further along.
_PYTHON_WORDS: Final = frozenset(
    {
        "as", "assert", "async", "await", "break", "class", "continue", "def", "del",
        "elif", "else", "except", "finally", "for", "from", "global", "if", "import",
        "is", "lambda", "nonlocal", "pass", "raise", "return", "try", "while", "with",
        "yield",
    }
)  # fmt: skip

_CONSTANTS: Final[Mapping[str, object]] = MappingProxyType(
    {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
)
_KEYWORDS: Final = frozenset({"and", "or", "not", "in", *_CONSTANTS})

_COMPARISON_OPS: Final = frozenset({"==", "!=", "<", "<=", ">", ">="})

# ASCII-only on purpose: ``\d`` would accept Arabic-Indic digits, and Decimal()
# alone would accept "NaN", "Infinity" and "1_000".
_NUMERIC_STRING: Final = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*", re.ASCII)

_TYPOGRAPHIC_QUOTES: Final = frozenset("\u2018\u2019\u201c\u201d")


# --------------------------------------------------------------------------- errors


class _Failure(Exception):
    """Raised inside evaluation; :meth:`Guard.evaluate` adds the source.

    Keeps the source string out of every node so evaluation passes one
    argument (the scope) down the tree.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


# --------------------------------------------------------------------------- values


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _shown(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # ints beyond sys.get_int_max_str_digits() refuse repr()
        return f"<{_type_name(value)}>"
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: object) -> Decimal | None:
    """``value`` as an exact Decimal if it is a number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        # str() first: Decimal(0.1) is 0.1000000000000000055..., never equal to 0.1.
        return Decimal(str(value))
    return None


def _numeric_string(value: str) -> Decimal | None:
    if _NUMERIC_STRING.fullmatch(value) is None:
        return None
    return Decimal(value.strip())


def _equal(left: object, right: object) -> bool:
    if left is right:
        return True
    if left is None or right is None:
        return False
    if isinstance(left, bool) or isinstance(right, bool):
        # Python says True == 1; a guard must not.
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    a = _number(left)
    b = _number(right)
    if a is not None or b is not None:
        if a is None and isinstance(left, str):
            a = _numeric_string(left)
        if b is None and isinstance(right, str):
            b = _numeric_string(right)
        if a is None or b is None:
            return False
        try:
            return a == b
        except InvalidOperation:  # signalling NaN
            return False
    if isinstance(left, str) or isinstance(right, str):
        return isinstance(left, str) and isinstance(right, str) and left == right
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(map(_equal, left, right))
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        if len(left) != len(right):
            return False
        return all(k in right and _equal(v, right[k]) for k, v in left.items())
    return left == right


def _order_operands(left: object, right: object, op: str) -> tuple[Decimal, Decimal] | None:
    """Operands for ``<``-style ops as Decimals, or None to compare as text.

    Raises ``_Failure`` (without a position) for combinations that cannot be ordered.
    """
    a = _number(left)
    b = _number(right)
    if a is not None and b is not None:
        return a, b
    if isinstance(left, str) and isinstance(right, str):
        a = _numeric_string(left)
        b = _numeric_string(right)
        return (a, b) if a is not None and b is not None else None
    if a is not None and isinstance(right, str):
        b = _numeric_string(right)
    elif b is not None and isinstance(left, str):
        a = _numeric_string(left)
    if a is not None and b is not None:
        return a, b
    raise _Failure(
        f"cannot compare {_type_name(left)} {_shown(left)} with "
        f"{_type_name(right)} {_shown(right)} using {op!r}; "
        "only numbers (or numeric strings) and strings can be ordered"
    )


_ORDERINGS: Final[Mapping[str, Callable[[Any, Any], Any]]] = MappingProxyType(
    {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
)


def _ordered(left: object, right: object, op: str) -> bool:
    if left is None or right is None:
        return False
    operands = _order_operands(left, right, op)
    compare = _ORDERINGS[op]
    if operands is None:
        return bool(compare(left, right))
    try:
        return bool(compare(*operands))
    except InvalidOperation:  # NaN has no order; Python floats say False, so do we
        return False


def _contains(container: object, item: object) -> bool:
    if container is None:
        return False
    if isinstance(container, str):
        if not isinstance(item, str):
            raise _Failure(
                f"'in' a string needs a string on the left, got {_type_name(item)} {_shown(item)}"
            )
        return item in container
    if isinstance(container, list | tuple):
        return any(_equal(item, element) for element in container)
    if isinstance(container, Mapping):
        # Only strings can be keys of data that came from JSON/YAML; anything
        # else (even unhashable lists) is simply not a key.
        return isinstance(item, str) and item in container
    raise _Failure(
        f"'in' needs a list, string or mapping on the right, "
        f"got {_type_name(container)} {_shown(container)}"
    )


# --------------------------------------------------------------------------- tree


class Node:
    """Base of the immutable expression tree."""

    __slots__ = ()

    def evaluate(self, scope: Mapping[str, object]) -> object:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Const(Node):
    value: object

    def evaluate(self, scope: Mapping[str, object]) -> object:
        return self.value


@dataclass(frozen=True, slots=True)
class Name(Node):
    path: tuple[str, ...]

    def evaluate(self, scope: Mapping[str, object]) -> object:
        path = self.path
        value = scope.get(path[0])
        for key in path[1:]:
            # ``type(...) is dict`` first: the ABC check is several times slower
            # and almost every scope value is a plain dict.
            if type(value) is dict or isinstance(value, Mapping):
                value = value.get(key)
            else:
                return None
        return value


@dataclass(frozen=True, slots=True)
class ListExpr(Node):
    items: tuple[Node, ...]

    def evaluate(self, scope: Mapping[str, object]) -> object:
        return tuple(item.evaluate(scope) for item in self.items)


@dataclass(frozen=True, slots=True)
class Not(Node):
    operand: Node

    def evaluate(self, scope: Mapping[str, object]) -> object:
        return not self.operand.evaluate(scope)


@dataclass(frozen=True, slots=True)
class And(Node):
    operands: tuple[Node, ...]

    def evaluate(self, scope: Mapping[str, object]) -> object:
        # A loop, not all(<genexpr>): no generator object per evaluation on the hot path.
        for operand in self.operands:  # noqa: SIM110
            if not operand.evaluate(scope):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Or(Node):
    operands: tuple[Node, ...]

    def evaluate(self, scope: Mapping[str, object]) -> object:
        for operand in self.operands:  # noqa: SIM110
            if operand.evaluate(scope):
                return True
        return False


@dataclass(frozen=True, slots=True)
class Negate(Node):
    operand: Node
    position: int

    def evaluate(self, scope: Mapping[str, object]) -> object:
        value = self.operand.evaluate(scope)
        if value is None:
            return None
        number = _number(value)
        if number is None and isinstance(value, str):
            number = _numeric_string(value)
        if number is None:
            raise _Failure(
                f"unary '-' needs a number, got {_type_name(value)} {_shown(value)}",
                self.position,
            )
        # copy_negate: unary minus would round to the context precision (28 digits)
        # and trap on a signalling NaN.
        return number.copy_negate()


@dataclass(frozen=True, slots=True)
class Compare(Node):
    op: str  # one of == != < <= > >= in, "not in"
    left: Node
    right: Node
    position: int  # of the operator

    def evaluate(self, scope: Mapping[str, object]) -> object:
        left = self.left.evaluate(scope)
        right = self.right.evaluate(scope)
        op = self.op
        try:
            if op == "==":
                return _equal(left, right)
            if op == "!=":
                return not _equal(left, right)
            if op == "in":
                return _contains(right, left)
            if op == "not in":
                return not _contains(right, left)
            return _ordered(left, right, op)
        except _Failure as exc:
            raise _Failure(exc.message, self.position) from None


@dataclass(frozen=True, slots=True)
class Call(Node):
    function: str
    args: tuple[Node, ...]
    position: int  # of the function name
    implementation: Callable[..., object] = field(repr=False, compare=False)

    def evaluate(self, scope: Mapping[str, object]) -> object:
        values = [arg.evaluate(scope) for arg in self.args]
        try:
            return self.implementation(*values)
        except _Failure as exc:
            raise _Failure(f"{self.function}(): {exc.message}", self.position) from None


# --------------------------------------------------------------------------- functions


@dataclass(frozen=True, slots=True)
class Function:
    """A function guards may call. ``takes_name``: the argument must be a dotted name."""

    arity: int
    implementation: Callable[..., object]
    takes_name: bool = False


def _len(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, str | list | tuple | Mapping):
        return len(value)
    raise _Failure(f"needs a string, list or mapping, got {_type_name(value)} {_shown(value)}")


def _lower(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, str):
        return value.lower()
    raise _not_a_string(value)


def _upper(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, str):
        return value.upper()
    raise _not_a_string(value)


def _not_a_string(value: object) -> _Failure:
    return _Failure(f"needs a string, got {_type_name(value)} {_shown(value)}")


def _defined(value: object) -> object:
    return value is not None


# An explicit registry (never getattr on a module): this is the whole list of
# code a guard can run.
FUNCTIONS: Final[Mapping[str, Function]] = MappingProxyType(
    {
        "defined": Function(1, _defined, takes_name=True),
        "len": Function(1, _len),
        "lower": Function(1, _lower),
        "upper": Function(1, _upper),
    }
)


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "number" | "string" | "name" | "keyword" | "op" | "eof"
    text: str
    position: int
    value: object = None  # number/string value, or the name path


_IDENT_START: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS: Final = _IDENT_START | frozenset("0123456789")
_DIGITS: Final = frozenset("0123456789")
_WHITESPACE: Final = frozenset(" \t\r\n")
_SINGLE_OPS: Final = frozenset("()[],<>-")
_DOUBLE_OPS: Final = frozenset({"==", "!=", "<=", ">="})
_MISTAKES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "=": "use '==' to compare",
        "!": "use 'not' to negate",
        "&": "use 'and'",
        "|": "use 'or'",
        "+": "arithmetic is not supported",
        "*": "arithmetic is not supported",
        "/": "arithmetic is not supported",
        "%": "arithmetic is not supported",
        "{": "mapping literals are not supported",
        "}": "mapping literals are not supported",
        ".": "dots are only allowed inside names, without spaces (order.amount)",
    }
)


def _python_word_message(word: str) -> str:
    if word == "is":
        return "'is' is not supported; use '==' or '!=' (e.g. x != null)"
    if word in ("if", "else"):
        return f"{word!r} is not supported; use 'and' / 'or'"
    return f"{word!r} is not supported in guards"


class _Tokenizer:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens: list[_Token] = []

    def error(self, message: str, position: int) -> GuardSyntaxError:
        return GuardSyntaxError(message, source=self.source, position=position)

    def run(self) -> list[_Token]:
        source = self.source
        end = len(source)
        i = 0
        while i < end:
            ch = source[i]
            if ch in _WHITESPACE:
                i += 1
            elif ch in _IDENT_START:
                i = self.name(i)
            elif ch in _DIGITS:
                i = self.number(i)
            elif ch in "'\"":
                i = self.string(i)
            elif source.startswith(("==", "!=", "<=", ">="), i):
                self.tokens.append(_Token("op", source[i : i + 2], i))
                i += 2
            elif ch in _SINGLE_OPS:
                self.tokens.append(_Token("op", ch, i))
                i += 1
            else:
                raise self.bad_character(ch, i)
        self.tokens.append(_Token("eof", "", end))
        return self.tokens

    def bad_character(self, ch: str, i: int) -> GuardSyntaxError:
        if ch in _MISTAKES:
            return self.error(f"unexpected {ch!r}: {_MISTAKES[ch]}", i)
        if ch in _TYPOGRAPHIC_QUOTES:
            return self.error(
                f"typographic quote {ch!r} (U+{ord(ch):04X}); use ' or \" around strings", i
            )
        if not ch.isascii():
            what = "in a name" if ch.isidentifier() or ch.isalnum() else "outside a string"
            return self.error(
                f"non-ASCII character {ch!r} (U+{ord(ch):04X}) {what}; names may only use "
                "ASCII letters, digits and '_' (other text belongs in quotes)",
                i,
            )
        return self.error(f"unexpected character {ch!r}", i)

    def name(self, start: int) -> int:
        source = self.source
        end = len(source)
        path: list[str] = []
        i = start
        while True:
            segment_start = i
            if i >= end or source[i] not in _IDENT_START:
                if i < end and source[i] in _DIGITS:
                    raise self.error(
                        "name parts cannot start with a digit; indexing is not supported", i
                    )
                if i < end and not source[i].isascii():
                    raise self.bad_character(source[i], i)
                raise self.error("expected a name after '.'", i)
            if source[i] == "_":
                raise self.error(
                    "names cannot start with '_' (private and dunder names are blocked)", i
                )
            while i < end and source[i] in _IDENT_CHARS:
                i += 1
            if i < end and not source[i].isascii() and source[i].isalnum():
                raise self.bad_character(source[i], i)
            path.append(source[segment_start:i])
            if i < end and source[i] == ".":
                i += 1
                continue
            break
        text = source[start:i]
        if text in _PYTHON_WORDS:
            # Checked here, before the tokenizer trips over what follows
            # (the ':' of a lambda), so the message names the real problem.
            raise self.error(_python_word_message(text), start)
        kind = "keyword" if len(path) == 1 and text in _KEYWORDS else "name"
        self.tokens.append(_Token(kind, text, start, tuple(path)))
        return i

    def number(self, start: int) -> int:
        source = self.source
        end = len(source)
        i = start
        while i < end and source[i] in _DIGITS:
            i += 1
        value: int | Decimal
        if i < end and source[i] == ".":
            i += 1
            if i >= end or source[i] not in _DIGITS:
                raise self.error("expected digits after the decimal point", i)
            while i < end and source[i] in _DIGITS:
                i += 1
            value = Decimal(source[start:i])
        else:
            value = int(source[start:i])
        if i < end and (source[i] in _IDENT_CHARS or source[i] == "."):
            raise self.error(
                f"invalid number {source[start : i + 1]!r}; numbers are digits with an "
                "optional decimal part (no exponents, no names starting with a digit)",
                i,
            )
        self.tokens.append(_Token("number", source[start:i], start, value))
        return i

    def string(self, start: int) -> int:
        source = self.source
        end = len(source)
        quote = source[start]
        chars: list[str] = []
        i = start + 1
        while i < end:
            ch = source[i]
            if ch == quote:
                self.tokens.append(_Token("string", source[start : i + 1], start, "".join(chars)))
                return i + 1
            if ch == "\\":
                following = source[i + 1] if i + 1 < end else ""
                if following not in ("\\", quote) or not following:
                    raise self.error(
                        f"unsupported escape '\\{following}'; only \\\\ and \\{quote} are allowed"
                        f" in a {quote}-quoted string",
                        i,
                    )
                chars.append(following)
                i += 2
            else:
                chars.append(ch)
                i += 1
        raise self.error(f"unterminated string: no closing {quote}", start)


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _Tokenizer(source).run()
        self.index = 0
        self.depth = 0
        self.names: set[tuple[str, ...]] = set()

    def error(self, message: str, token: _Token) -> GuardSyntaxError:
        return GuardSyntaxError(message, source=self.source, position=token.position)

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def peek(self, offset: int = 1) -> _Token:
        return self.tokens[min(self.index + offset, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "eof":
            self.index += 1
        return token

    def at(self, kind: str, text: str) -> bool:
        token = self.tokens[self.index]
        return token.kind == kind and token.text == text

    def expect_closing(self, text: str, opener: _Token) -> None:
        if not self.at("op", text):
            raise self.error(
                f"expected {text!r} to close {opener.text!r} from column {opener.position + 1}, "
                f"found {self.describe(self.token)}",
                self.token,
            )
        self.advance()

    @staticmethod
    def describe(token: _Token) -> str:
        if token.kind == "eof":
            return "end of guard"
        return repr(token.text)

    def enter(self, token: _Token) -> None:
        # Counted per construct rather than per Python frame; every construct
        # is a fixed number of frames, so this also bounds evaluation recursion.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"guard is nested more than {MAX_DEPTH} levels deep", token)

    def leave(self) -> None:
        self.depth -= 1

    # ----------------------------------------------------------------- grammar

    def parse(self) -> Node:
        if self.token.kind == "eof":
            raise self.error("empty guard; write an expression such as order.found", self.token)
        node = self.or_expr()
        token = self.token
        if token.kind != "eof":
            raise self.error(self.trailing_message(token), token)
        return node

    def trailing_message(self, token: _Token) -> str:
        if token.kind == "op" and token.text in ")]":
            return f"unmatched {token.text!r}"
        return (
            f"unexpected {self.describe(token)} after a complete expression; "
            "combine conditions with 'and' / 'or'"
        )

    def or_expr(self) -> Node:
        operands = [self.and_expr()]
        while self.at("keyword", "or"):
            self.advance()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_expr(self) -> Node:
        operands = [self.not_expr()]
        while self.at("keyword", "and"):
            self.advance()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_expr(self) -> Node:
        if self.at("keyword", "not"):
            token = self.advance()
            if self.at("keyword", "in"):
                raise self.error("'not in' needs a value on its left", token)
            self.enter(token)
            operand = self.not_expr()
            self.leave()
            return Not(operand)
        return self.comparison()

    def comparison_op(self) -> tuple[str, _Token] | None:
        token = self.token
        if token.kind == "op" and token.text in _COMPARISON_OPS:
            return token.text, token
        if token.kind == "keyword" and token.text == "in":
            return "in", token
        if token.kind == "keyword" and token.text == "not":
            following = self.peek()
            if following.kind == "keyword" and following.text == "in":
                return "not in", token
        return None

    def comparison(self) -> Node:
        left = self.unary()
        found = self.comparison_op()
        if found is None:
            return left
        op, token = found
        self.advance()
        if op == "not in":
            self.advance()
        right = self.unary()
        again = self.comparison_op()
        if again is not None:
            raise self.error(
                f"comparisons cannot be chained ({op!r} then {again[0]!r}); "
                "write 'a < b and b < c'",
                again[1],
            )
        return Compare(op, left, right, token.position)

    def unary(self) -> Node:
        if self.at("op", "-"):
            token = self.advance()
            self.enter(token)
            operand = self.unary()
            self.leave()
            value = operand.value if isinstance(operand, Const) else None
            if isinstance(value, int | Decimal) and not isinstance(value, bool):
                # Fold "-5" so literal lists like [-1, 0] stay constant.
                return Const(value.copy_negate() if isinstance(value, Decimal) else -value)
            return Negate(operand, token.position)
        return self.primary()

    def primary(self) -> Node:
        token = self.token
        node: Node
        if token.kind == "number" or token.kind == "string":
            self.advance()
            node = Const(token.value)
        elif token.kind == "keyword" and token.text in _CONSTANTS:
            self.advance()
            node = Const(_CONSTANTS[token.text])
        elif token.kind == "name":
            node = self.name_or_call()
        elif token.kind == "op" and token.text == "(":
            self.advance()
            self.enter(token)
            node = self.or_expr()
            self.leave()
            self.expect_closing(")", token)
        elif token.kind == "op" and token.text == "[":
            node = self.list_literal()
        else:
            raise self.error(self.missing_operand_message(token), token)
        self.reject_postfix(node)
        return node

    def missing_operand_message(self, token: _Token) -> str:
        if token.kind == "keyword":
            return f"expected a value, found keyword {token.text!r}"
        return f"expected a value, found {self.describe(token)}"

    def reject_postfix(self, node: Node) -> None:
        token = self.token
        if token.kind != "op":
            return
        if token.text == "[":
            raise self.error(
                "indexing is not supported; use dotted names such as order.items", token
            )
        if token.text == "(":
            raise self.error(
                "only the functions " + ", ".join(sorted(FUNCTIONS)) + " can be called", token
            )

    def name_or_call(self) -> Node:
        token = self.advance()
        assert isinstance(token.value, tuple)
        path: tuple[str, ...] = token.value
        if not self.at("op", "("):
            self.names.add(path)
            return Name(path)
        known = ", ".join(sorted(FUNCTIONS))
        function = FUNCTIONS.get(token.text)
        if function is None:
            raise self.error(f"unknown function {token.text!r}; known functions: {known}", token)
        opener = self.advance()
        self.enter(opener)
        args: list[Node] = []
        if not self.at("op", ")"):
            args.append(self.argument(function, token))
            while self.at("op", ","):
                self.advance()
                args.append(self.argument(function, token))
        self.expect_closing(")", opener)
        self.leave()
        if len(args) != function.arity:
            raise self.error(
                f"{token.text}() takes {function.arity} argument(s), got {len(args)}", token
            )
        return Call(token.text, tuple(args), token.position, function.implementation)

    def argument(self, function: Function, call: _Token) -> Node:
        start = self.token
        node = self.or_expr()
        if function.takes_name and not isinstance(node, Name):
            raise self.error(f"{call.text}() takes a name, such as {call.text}(order.id)", start)
        return node

    def list_literal(self) -> Node:
        opener = self.advance()
        self.enter(opener)
        items: list[Node] = []
        while not self.at("op", "]") and self.token.kind != "eof":
            items.append(self.or_expr())
            if not self.at("op", ","):
                break
            self.advance()
        self.expect_closing("]", opener)
        self.leave()
        if all(isinstance(item, Const) for item in items):
            # Literal lists are the common case (reason in ["a", "b"]): build once.
            return Const(tuple(item.value for item in items))  # type: ignore[attr-defined]
        return ListExpr(tuple(items))


# --------------------------------------------------------------------------- public


@dataclass(frozen=True, slots=True)
class Guard:
    """A parsed ``when:`` expression. Constructing one parses it (GuardSyntaxError)."""

    source: str
    _tree: Node = field(init=False, repr=False, compare=False, hash=False)
    _names: frozenset[tuple[str, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        source: object = self.source
        if not isinstance(source, str):
            # YAML turns ``when: true`` or ``when: 1`` into a bool/int.
            raise GuardSyntaxError(
                f"a guard must be a string, got {type(source).__name__}; quote it in YAML",
                source=repr(source),
                position=None,
            )
        if len(source) > MAX_SOURCE_LENGTH:
            raise GuardSyntaxError(
                f"guard is longer than {MAX_SOURCE_LENGTH} characters; "
                "move the logic into an action or split the transition",
                source=source[:MAX_SOURCE_LENGTH] + "...",
                position=MAX_SOURCE_LENGTH,
            )
        parser = _Parser(source)
        tree = parser.parse()
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_names", frozenset(parser.names))

    @property
    def names(self) -> frozenset[tuple[str, ...]]:
        """Every dotted name path the guard reads, e.g. ``{("order", "amount")}``."""
        return self._names

    def evaluate(self, scope: Mapping[str, object]) -> bool:
        """The guard's truth value over ``scope``; raises GuardEvaluationError on type errors."""
        try:
            return bool(self._tree.evaluate(scope))
        except _Failure as exc:
            raise GuardEvaluationError(
                exc.message, source=self.source, position=exc.position
            ) from None


def parse_guard(source: str) -> Guard:
    """Parse ``source`` into a :class:`Guard`; raises GuardSyntaxError with a position."""
    return Guard(source)
