"""Tests for the ``when:`` guard language (engine/flow/guards.py)."""

from __future__ import annotations

import copy
import pickle
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import GuardError, GuardEvaluationError, GuardSyntaxError
from engine.flow.guards import FUNCTIONS, MAX_DEPTH, MAX_SOURCE_LENGTH, Guard, parse_guard


def ev(source: str, **scope: object) -> bool:
    return parse_guard(source).evaluate(scope)


def syntax_error(source: str) -> GuardSyntaxError:
    with pytest.raises(GuardSyntaxError) as info:
        parse_guard(source)
    return info.value


def evaluation_error(source: str, **scope: object) -> GuardEvaluationError:
    guard = parse_guard(source)
    with pytest.raises(GuardEvaluationError) as info:
        guard.evaluate(scope)
    return info.value


# --------------------------------------------------------------------------- examples


class TestFlowExamples:
    def test_refund_auto_approve(self) -> None:
        guard = parse_guard("order.found and order.amount <= policy.refund_auto_approve_max")
        policy = {"refund_auto_approve_max": "150.00"}
        assert guard.evaluate({"order": {"found": True, "amount": "129.00"}, "policy": policy})
        assert not guard.evaluate({"order": {"found": True, "amount": "150.01"}, "policy": policy})
        assert not guard.evaluate({"order": {"found": False, "amount": "1"}, "policy": policy})
        assert not guard.evaluate({})

    def test_reason_list(self) -> None:
        guard = parse_guard('reason in ["damaged", "wrong_item"] and not order.refunded')
        assert guard.evaluate({"reason": "damaged", "order": {"refunded": False}})
        assert guard.evaluate({"reason": "wrong_item", "order": {}})
        assert not guard.evaluate({"reason": "damaged", "order": {"refunded": True}})
        assert not guard.evaluate({"reason": "late", "order": {"refunded": False}})

    def test_not_null(self) -> None:
        guard = parse_guard("order_id != null")
        assert not guard.evaluate({})
        assert not guard.evaluate({"order_id": None})
        assert guard.evaluate({"order_id": "A-1"})

    def test_python_spellings_of_constants(self) -> None:
        assert ev("x == None")
        assert ev("True and not False")
        assert ev("true == True and false == False and null == None")


# --------------------------------------------------------------------------- precedence


class TestPrecedence:
    def test_and_binds_tighter_than_or(self) -> None:
        assert ev("a or b and c", a=True, b=False, c=False)
        assert not ev("(a or b) and c", a=True, b=False, c=False)

    def test_not_binds_looser_than_comparison(self) -> None:
        # Python semantics: not (x == 1), not (not x) == 1.
        assert ev("not x == 1", x=2)
        assert not ev("not x == 1", x=1)
        assert ev("not x in [1, 2]", x=3)

    def test_not_binds_tighter_than_and(self) -> None:
        assert not ev("not a and b", a=True, b=True)
        assert ev("not a and b", a=False, b=True)

    def test_double_not(self) -> None:
        assert ev("not not a", a=1)

    def test_unary_minus_binds_tightest(self) -> None:
        assert ev("-x < 0", x=5)
        assert ev("- -x == 5", x=5)
        assert ev("-1 in [-1, 2]")
        assert ev("-x == -129", x="129.00")

    def test_parentheses(self) -> None:
        assert ev("not (a and b)", a=True, b=False)
        assert ev("((a))", a=True)


class TestShortCircuit:
    def test_or_skips_the_right_side(self) -> None:
        # The right side would raise (number < string); it must not run.
        assert ev("a or x < 'text'", a=True, x=1)
        with pytest.raises(GuardEvaluationError):
            ev("a or x < 'text'", a=False, x=1)

    def test_and_skips_the_right_side(self) -> None:
        assert not ev("a and x < 'text'", a=False, x=1)
        with pytest.raises(GuardEvaluationError):
            ev("a and x < 'text'", a=True, x=1)

    def test_results_are_booleans(self) -> None:
        assert parse_guard("a or b").evaluate({"a": "", "b": "yes"}) is True
        assert parse_guard("a and b").evaluate({"a": "x", "b": 0}) is False
        assert parse_guard("a").evaluate({"a": [1]}) is True
        assert parse_guard("a").evaluate({"a": Decimal("0.00")}) is False


# --------------------------------------------------------------------------- operators


class TestMembership:
    def test_list(self) -> None:
        assert ev("x in ['a', 'b']", x="a")
        assert ev("x not in ['a', 'b']", x="c")
        assert not ev("x not in ['a', 'b']", x="b")
        assert ev("x in []") is False

    def test_list_from_scope_and_numeric_elements(self) -> None:
        assert ev("3 in xs", xs=[1, 2, 3])
        assert ev("'3.0' in xs", xs=[1, 2, 3])
        assert not ev("true in xs", xs=[1])
        assert ev("x in [y, 2]", x=5, y=5)

    def test_substring(self) -> None:
        assert ev("'refund' in lower(text)", text="I want a REFUND please")
        assert not ev("'x' in text", text="abc")

    def test_mapping_keys(self) -> None:
        assert ev("'sku' in item", item={"sku": 1})
        assert not ev("'price' in item", item={"sku": 1})
        assert not ev("1 in item", item={"1": 1})

    def test_null_container_is_empty(self) -> None:
        assert not ev("x in missing", x=1)
        assert ev("x not in missing", x=1)

    def test_null_element(self) -> None:
        assert ev("x in [null, 1]")
        assert not ev("x in [1]")

    def test_type_errors(self) -> None:
        err = evaluation_error("x in 5", x=1)
        assert err.position == 2
        assert "list, string or mapping" in err.message
        err = evaluation_error("x not in 'abc'", x=1)
        assert err.position == 2
        assert "string on the left" in err.message


class TestEquality:
    def test_booleans_are_not_numbers(self) -> None:
        assert not ev("x == 1", x=True)
        assert not ev("x == 0", x=False)
        assert ev("x != 1", x=True)
        assert ev("x == true", x=True)

    def test_unrelated_types_are_unequal_not_errors(self) -> None:
        assert not ev("x == 'a'", x=1)
        assert not ev("x == [1]", x={"a": 1})
        assert ev("x != 'a'", x=None)

    def test_numbers_across_types(self) -> None:
        assert ev("x == 1", x=1.0)
        assert ev("x == 0.1", x=0.1)  # float via str(): exact against the literal
        assert ev("x == 129", x=Decimal("129.00"))
        assert ev("x == 129.00", x=129)

    def test_numeric_strings(self) -> None:
        assert ev("x == 129", x="129.00")
        assert ev("x == 129.5", x=" 129.50 ")
        assert not ev("x == 1", x="1e0")  # exponents are not money
        assert not ev("x == 1", x="NaN")

    def test_two_strings_compare_as_text(self) -> None:
        assert not ev("x == '129'", x="129.00")
        assert ev("x == 'a\\'b'", x="a'b")

    def test_lists_and_mappings(self) -> None:
        assert ev("x == [1, 'a', null]", x=[Decimal(1), "a", None])
        assert not ev("x == [1, 2]", x=[1])
        assert ev("x == y", x={"a": "1.0"}, y={"a": 1})
        assert not ev("x == y", x={"a": 1}, y={"b": 1})

    def test_nan_is_unequal_without_error(self) -> None:
        assert not ev("x == y", x=float("nan"), y=float("nan"))
        assert not ev("x == 1", x=Decimal("sNaN"))


class TestOrdering:
    def test_null_on_either_side_is_false(self) -> None:
        for op in ("<", "<=", ">", ">="):
            assert not ev(f"x {op} 1")
            assert not ev(f"1 {op} x")
            assert not ev(f"x {op} y")
            assert not ev(f"x.y.z {op} 1", x="not a mapping")

    def test_numbers(self) -> None:
        assert ev("x < 2", x=1.5)
        assert ev("x <= 2", x=Decimal("2.000"))
        assert ev("x > 0.1", x=0.11)
        assert ev("x >= 10", x=10)

    def test_decimal_money_is_exact(self) -> None:
        assert ev("x <= 150.00", x="149.99")
        assert not ev("x <= 150.00", x="150.001")
        assert ev("x < 0.3", x=0.1 + 0.1)  # 0.2 as float, compared via str()

    def test_two_money_strings_compare_numerically(self) -> None:
        # As text "129.00" > "1000.00"; a refund limit must never compare as text.
        assert ev("amount <= limit", amount="129.00", limit="1000.00")
        assert not ev("amount > limit", amount="129.00", limit="1000.00")

    def test_other_strings_compare_as_text(self) -> None:
        assert ev("d < '2024-06-01'", d="2024-05-31")
        assert ev("'abc' < 'abd'")

    def test_number_vs_text_is_an_error(self) -> None:
        err = evaluation_error("x < 'abc'", x=5)
        assert err.position == 2
        assert "cannot compare number 5 with string 'abc'" in err.message
        assert "'<'" in err.message
        assert err.source == "x < 'abc'"

    def test_booleans_cannot_be_ordered(self) -> None:
        err = evaluation_error("x > 0", x=True)
        assert "boolean" in err.message

    def test_lists_cannot_be_ordered(self) -> None:
        assert evaluation_error("x < [1]", x=[0]).position == 2

    def test_nan_orders_false(self) -> None:
        assert not ev("x < 1", x=float("nan"))
        assert not ev("x >= 1", x=Decimal("NaN"))
        assert not ev("x >= 1", x=Decimal("sNaN"))

    def test_infinity(self) -> None:
        assert ev("x > 1000000", x=float("inf"))


class TestUnaryMinus:
    def test_null_stays_null(self) -> None:
        assert ev("-x == null")

    def test_non_number_is_an_error(self) -> None:
        err = evaluation_error("1 == -x", x="abc")
        assert err.position == 5
        assert "unary '-'" in err.message

    def test_boolean_is_not_a_number(self) -> None:
        assert evaluation_error("-x == 1", x=True).position == 0

    def test_exact_for_long_decimals(self) -> None:
        assert ev(
            "-x == -1.234567890123456789012345678901234", x="1.234567890123456789012345678901234"
        )


class TestFunctions:
    def test_len(self) -> None:
        assert ev("len(x) == 3", x="abc")
        assert ev("len(x) == 2", x=[1, 2])
        assert ev("len(x) == 1", x={"a": 1})
        assert ev("len(x) == null")

    def test_len_of_number_is_an_error(self) -> None:
        err = evaluation_error("a or len(x) > 1", x=5)
        assert err.position == 5
        assert err.message.startswith("len():")

    def test_lower_upper(self) -> None:
        assert ev("lower(x) == 'yes'", x="YeS")
        assert ev("upper(x) == 'YES'", x="yes")
        assert ev("lower(x) == null")
        assert evaluation_error("upper(x) == 'A'", x=1).position == 0

    def test_defined(self) -> None:
        assert not ev("defined(order.id)")
        assert not ev("defined(order.id)", order={"id": None})
        assert ev("defined(order.id)", order={"id": 0})
        assert ev("not defined(x)")

    def test_registry_is_read_only(self) -> None:
        assert set(FUNCTIONS) == {"len", "lower", "upper", "defined"}
        with pytest.raises(TypeError):
            FUNCTIONS["eval"] = FUNCTIONS["len"]  # type: ignore[index]


class TestNames:
    def test_missing_names_and_keys_are_null(self) -> None:
        assert ev("a == null and a.b == null and a.b.c == null")
        assert ev("a.b == null", a={})
        assert ev("a.b.c == null", a={"b": 5})
        assert ev("a.b.c == 1", a={"b": {"c": 1}})

    def test_non_mapping_attributes_are_not_reachable(self) -> None:
        class Sneaky:
            secret = "leak"

        assert ev("obj.secret == null", obj=Sneaky())
        assert ev("s.upper == null", s="text")

    def test_keywords_are_fine_after_a_dot(self) -> None:
        assert ev(
            "mail.from == 'x' and flags.in and flags.not",
            mail={"from": "x"},
            flags={"in": 1, "not": 1},
        )

    def test_names_extraction(self) -> None:
        guard = parse_guard(
            "order.found and order.amount <= policy.refund_auto_approve_max "
            "and reason in ['a', other] and defined(customer.email) and len(lower(x.y)) > 0"
        )
        assert guard.names == frozenset(
            {
                ("order", "found"),
                ("order", "amount"),
                ("policy", "refund_auto_approve_max"),
                ("reason",),
                ("other",),
                ("customer", "email"),
                ("x", "y"),
            }
        )

    def test_names_exclude_literals_keywords_and_functions(self) -> None:
        assert (
            parse_guard("true and null == None and 'a' in ['a'] and len('x') == 1").names
            == frozenset()
        )


# --------------------------------------------------------------------------- syntax errors


@pytest.mark.parametrize(
    ("source", "position", "fragment"),
    [
        ("", 0, "empty guard"),
        ("   ", 3, "empty guard"),
        ("a < b < c", 6, "cannot be chained"),
        ("a == b != c", 7, "cannot be chained"),
        ("a in b in c", 7, "cannot be chained"),
        ("a < b not in c", 6, "cannot be chained"),
        ("__class__", 0, "cannot start with '_'"),
        ("x.__class__", 2, "cannot start with '_'"),
        ("x._private", 2, "cannot start with '_'"),
        ("().__class__", 2, "dots are only allowed inside names"),
        ("()", 1, "expected a value, found ')'"),
        ("import os", 0, "'import' is not supported"),
        ("lambda: 1", 0, "'lambda' is not supported"),
        ("x is None", 2, "use '==' or '!='"),
        ("a if b else c", 2, "'if' is not supported"),
        ("a[0]", 1, "indexing is not supported"),
        ("a.0", 2, "indexing is not supported"),
        ("(a)(b)", 3, "only the functions"),
        ("len(a)(b)", 6, "only the functions"),
        ("eval('1')", 0, "unknown function 'eval'; known functions: defined, len, lower, upper"),
        ("__import__('os')", 0, "cannot start with '_'"),
        ("os.system('ls')", 0, "unknown function 'os.system'"),
        ("len()", 0, "takes 1 argument(s), got 0"),
        ("len(a, b)", 0, "takes 1 argument(s), got 2"),
        ("defined('x')", 8, "takes a name"),
        ("defined(a or b)", 8, "takes a name"),
        ("café == 1", 3, "non-ASCII character 'é'"),
        ("naïve", 2, "non-ASCII"),
        ("x == “a”", 5, "typographic quote"),
        ("x == 1 → y", 7, "non-ASCII"),
        ("'abc", 0, "unterminated string"),
        ('x == "abc', 5, "unterminated string"),
        ("'a\\nb'", 2, "unsupported escape"),
        ("'a\\", 2, "unsupported escape"),
        ("a = 1", 2, "use '=='"),
        ("!a", 0, "use 'not'"),
        ("a && b", 2, "use 'and'"),
        ("a || b", 2, "use 'or'"),
        ("a + 1", 2, "arithmetic"),
        ("{'a': 1}", 0, "mapping literals"),
        ("a .b", 2, "without spaces"),
        ("a. b", 2, "expected a name after '.'"),
        ("a.", 2, "expected a name after '.'"),
        ("1.x", 2, "expected digits after the decimal point"),
        ("1.", 2, "expected digits after the decimal point"),
        ("1e5", 1, "invalid number"),
        ("1.5.5", 3, "invalid number"),
        ("12abc", 2, "invalid number"),
        ("a and", 5, "expected a value, found end of guard"),
        ("a or or b", 5, "expected a value, found keyword 'or'"),
        ("not in x", 0, "'not in' needs a value"),
        ("a not b", 2, "after a complete expression"),
        ("a b", 2, "after a complete expression"),
        ("a == 1 )", 7, "unmatched ')'"),
        ("]", 0, "expected a value, found ']'"),
        ("(a", 2, "expected ')' to close '(' from column 1"),
        ("len(a", 5, "expected ')' to close '(' from column 4"),
        ("[1, 2", 5, "expected ']' to close '['"),
        ("[1 2]", 3, "expected ']' to close '['"),
        ("[1,,]", 3, "expected a value, found ','"),
        ("a ; b", 2, "unexpected character ';'"),
        ("`a`", 0, "unexpected character '`'"),
    ],
)
def test_syntax_error_positions(source: str, position: int, fragment: str) -> None:
    err = syntax_error(source)
    assert err.position == position, err
    assert fragment in err.message, err
    assert err.source == source
    assert isinstance(err, GuardError)
    # The rendered message is what flow authors read: it names the column.
    assert f"column {position + 1}" in str(err)


class TestHostileInput:
    def test_too_long(self) -> None:
        source = "a or " * 300 + "a"
        err = syntax_error(source)
        assert err.position == MAX_SOURCE_LENGTH
        assert str(MAX_SOURCE_LENGTH) in err.message
        assert len(str(err)) < MAX_SOURCE_LENGTH + 200

    def test_long_but_within_limit(self) -> None:
        source = " or ".join(["a"] * 200)
        assert len(source) <= MAX_SOURCE_LENGTH
        assert not parse_guard(source).evaluate({})

    @pytest.mark.parametrize(
        "source",
        [
            "(" * 40 + "a" + ")" * 40,
            "not " * 40 + "a",
            "-" * 40 + "1",
            "[" * 40 + "]" * 40,
            "len(" * 40 + "a" + ")" * 40,
        ],
    )
    def test_deep_nesting(self, source: str) -> None:
        err = syntax_error(source)
        assert f"more than {MAX_DEPTH} levels" in err.message
        assert err.position is not None

    def test_nesting_at_the_limit_is_fine(self) -> None:
        assert parse_guard("(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH).evaluate({"a": 1})

    def test_unicode_inside_strings_is_fine(self) -> None:
        assert ev("name == 'café ☕'", name="café ☕")

    def test_non_string_source(self) -> None:
        # YAML turns ``when: true`` into a bool.
        with pytest.raises(GuardSyntaxError, match="must be a string"):
            parse_guard(True)  # type: ignore[arg-type]

    def test_unicode_digits_are_not_numbers(self) -> None:
        assert syntax_error("x == ١").position == 5
        assert not ev("x == 1", x="١")


# --------------------------------------------------------------------------- Guard object


class TestGuardObject:
    def test_construction_parses(self) -> None:
        with pytest.raises(GuardSyntaxError):
            Guard("a <")
        assert Guard("a").evaluate({"a": True})

    def test_value_semantics(self) -> None:
        guard = parse_guard("a.b in [1, -2, 'x'] and len(c) > 0")
        assert guard == parse_guard("a.b in [1, -2, 'x'] and len(c) > 0")
        assert hash(guard) == hash(copy.deepcopy(guard))
        restored = pickle.loads(pickle.dumps(guard))
        assert restored.evaluate({"a": {"b": -2}, "c": "x"})
        assert repr(guard) == "Guard(source=\"a.b in [1, -2, 'x'] and len(c) > 0\")"

    def test_immutable(self) -> None:
        guard = parse_guard("a")
        with pytest.raises(AttributeError):
            guard.source = "b"  # type: ignore[misc]

    def test_evaluation_error_carries_source_and_position(self) -> None:
        err = evaluation_error("ok and n >= 'x'", ok=True, n=1)
        assert err.source == "ok and n >= 'x'"
        assert err.position == 9
        assert "column 10" in str(err)


# --------------------------------------------------------------------------- properties

_TOKENS = [
    "a", "b", "order", "order.amount", "x.y.z", "len", "lower", "upper", "defined", "foo",
    "and", "or", "not", "in", "not in", "true", "false", "null", "None",
    "==", "!=", "<", "<=", ">", ">=", "-", "(", ")", "[", "]", ",", ".",
    "0", "1", "129.00", "-5", "'s'", '"t"', "'", '"', "\\", "_x", "__class__",
    "é", "=", "!", "+", "lambda", "import", "is", " ", "1.", "[1, 2]",
]  # fmt: skip

_NAMES = ["a", "b", "order", "amount", "x", "y", "z"]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.decimals(),
    st.text(max_size=8),
    st.sampled_from(["129.00", "1000", " 3 ", "-0.5", "NaN", "1e3", ""]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(_NAMES), inner, max_size=4),
    ),
    max_leaves=12,
)
_scopes = st.dictionaries(st.sampled_from(_NAMES), _values, max_size=len(_NAMES))

_atoms = st.one_of(
    st.sampled_from(["a", "b", "order.amount", "x.y.z", "amount", "y"]),
    st.sampled_from(["0", "1", "129.00", "'129.00'", "'s'", "true", "null", "[1, 'a']", "[]"]),
)


def _combine(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    ops = ["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
    return st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(" ".join),
        st.tuples(inner, st.sampled_from(ops), inner).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})"),
        inner.map(lambda e: f"not ({e})"),
        inner.map(lambda e: f"-({e})"),
        st.tuples(st.sampled_from(["len", "lower", "upper"]), inner).map(
            lambda t: f"{t[0]}({t[1]})"
        ),
        st.sampled_from(_NAMES).map(lambda n: f"defined({n})"),
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
    )


_guards = st.recursive(_atoms, _combine, max_leaves=8)


@given(
    st.one_of(st.text(max_size=80), st.lists(st.sampled_from(_TOKENS), max_size=20).map(" ".join))
)
@settings(max_examples=500)
def test_parse_never_raises_anything_but_syntax_error(source: str) -> None:
    try:
        guard = parse_guard(source)
    except GuardSyntaxError as err:
        assert err.source == source or len(source) > MAX_SOURCE_LENGTH
        assert err.position is None or 0 <= err.position <= len(source)
    else:
        assert guard.source == source
        assert all(path and not any(p.startswith("_") for p in path) for path in guard.names)


@given(_guards, _scopes)
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_evaluate_never_raises_anything_but_evaluation_error(
    source: str, scope: dict[str, object]
) -> None:
    try:
        guard = parse_guard(source)
    except GuardSyntaxError:
        return  # nesting beyond MAX_DEPTH is the only expected failure
    try:
        result = guard.evaluate(scope)
    except GuardEvaluationError as err:
        assert err.source == source
        assert err.position is not None and 0 <= err.position < len(source)
    else:
        assert isinstance(result, bool)


@given(_guards)
def test_generated_guards_parse(source: str) -> None:
    # Keeps the property above honest: it must exercise evaluation, not only syntax errors.
    parse_guard(source)
