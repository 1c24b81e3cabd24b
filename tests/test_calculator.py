import pytest

from agentserve.calculator import CalculatorError, evaluate, format_number


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("12 * 8", 96), ("(3 + 4) ** 2", 49), ("7 / 2", 3.5), ("-5 + 2", -3), ("2 ^ 10", 1024), ("17 % 5", 2)],
)
def test_evaluates_arithmetic(expression: str, expected: float) -> None:
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9",
        "10 ** 101",
        "2 ** 100000",
        "1 / 0",
        "__import__('os').system('true')",
        "abs(-1)",
        "x + 1",
        "'a' * 3",
        "[1, 2]",
        "1 +",
        "1" * 201,
    ],
)
def test_refuses_what_is_not_small_arithmetic(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_formats_whole_floats_as_integers() -> None:
    assert format_number(96.0) == "96"
    assert format_number(3.5) == "3.5"
