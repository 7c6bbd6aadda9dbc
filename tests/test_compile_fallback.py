"""`train.compile`'s guard: a compiler failure on an optional compiled function falls back to the
eager function for good, with one warning, and the call that failed returns the eager result."""

import logging

import pytest
import torch

from dreamfusion_trt.train.trainer import compiled_or_eager


def test_a_compiler_failure_falls_back_to_eager_once(caplog):
    calls = {"compiled": 0, "eager": 0}

    def compiled(x):
        calls["compiled"] += 1
        raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("Argument 'item' of Node 'clamp'\nmore"), None)

    def eager(x):
        calls["eager"] += 1
        return x + 1

    run = compiled_or_eager(compiled, eager, "the field query")
    with caplog.at_level(logging.WARNING):
        assert run(1) == 2 and run(2) == 3
    assert calls == {"compiled": 1, "eager": 2}  # the compiler is not asked again
    warnings = [r for r in caplog.records if "did not compile" in r.getMessage()]
    assert len(warnings) == 1 and "the field query" in warnings[0].getMessage()


def test_other_errors_are_not_swallowed():
    def compiled(x):
        raise ValueError("a real bug in the function")

    run = compiled_or_eager(compiled, lambda x: x, "the field query")
    with pytest.raises(ValueError, match="a real bug"):
        run(1)


def test_a_working_compiled_function_is_used():
    run = compiled_or_eager(lambda x: x * 2, lambda x: x, "f")
    assert run(3) == 6
