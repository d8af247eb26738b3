"""Fuzzing of every registered op (tests/fuzz/fuzz_ops.py draws the cases): valid inputs match the references,
and invalid inputs raise an exception whose message names the argument and the value. A crash or an abort would
end the whole pytest run, which is itself a loud failure.

CI runs ``--fuzz-cases`` cases per op and device (default in tests/conftest.py); for a longer run:
``pytest tests/fuzz --fuzz-cases 5000 --fuzz-seed 7``. A failure lists the case's op, mutation and seed.
"""

import random
import re

import pytest
import torch

from conftest import DEVICE_PARAMS, mentions
from fuzz_data import Case
from fuzz_ops import GENERATORS


def run_case(case: Case) -> str | None:
    """Runs one case; returns what went wrong, or None."""
    if case.error is not None:
        exc_types, arg, value = case.error
        try:
            case.call()
        except exc_types as error:
            if not re.search(mentions(arg, value), str(error)):
                return f"message does not name {arg!r} and {value!r}: {str(error)[:300]!r}"
            return None
        except Exception as error:  # noqa: BLE001  (any other type is a finding)
            return f"raised {type(error).__name__} instead of {exc_types}: {str(error)[:300]!r}"
        return f"did not raise (expected {exc_types} naming {arg!r} and {value!r})"
    try:
        result = case.call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a CUDA case without an expected error must finish cleanly
        if case.check is not None:
            case.check(result)
        if case.meta_call is not None:
            _check_meta(result, case.meta_call())
    except AssertionError as error:
        return f"wrong result: {error}"
    except Exception as error:  # noqa: BLE001
        return f"valid input raised {type(error).__name__}: {str(error)[:300]!r}"
    return None


def _check_meta(result, meta_result) -> None:
    """The Meta kernel gives every output the shape and dtype of the real kernel's."""
    real = result if isinstance(result, (tuple, list)) else (result,)
    fake = meta_result if isinstance(meta_result, (tuple, list)) else (meta_result,)
    assert len(real) == len(fake), f"meta returns {len(fake)} outputs, the kernel {len(real)}"
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        assert f.device.type == "meta", f"output {i} of the meta call is on {f.device}"
        assert r.shape == f.shape and r.dtype == f.dtype, f"output {i}: meta {f.shape}/{f.dtype} vs {r.shape}/{r.dtype}"


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("op_name", sorted(GENERATORS))
def test_fuzz_op(op_name, device, fuzz_budget):
    num_cases, first_seed = fuzz_budget
    failures, kinds = [], set()
    for i in range(num_cases):
        seed = first_seed + i
        case = GENERATORS[op_name](random.Random(f"{op_name}-{seed}"), device)
        kinds.add(case.name)
        problem = run_case(case)
        if problem is not None:
            failures.append(f"{case.name} (--fuzz-seed {seed} --fuzz-cases 1): {problem}")
    assert not failures, f"{len(failures)} of {num_cases} cases failed:\n" + "\n".join(failures[:20])
    if num_cases >= 50:
        assert f"{op_name}/valid" in kinds, "the budget must reach valid cases"
        assert len(kinds) >= 3, f"the budget reached only {sorted(kinds)}"


def test_every_registered_op_is_fuzzed():
    names = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastmoe::")}
    # The collectives need a process group of several ranks: tests/distributed covers them, and
    # test_exchange_rejects_bad_input below their single-process argument checks.
    collectives = ("exchange", "exchange_counts", "exchange_hierarchical", "check_same_config")
    missing = {name for name in names if name not in GENERATORS and name not in collectives}
    assert not missing, f"registered ops without a fuzz generator in tests/fuzz/fuzz_ops.py: {sorted(missing)}"


def test_generators_are_reproducible():
    """A seed names a case: the same seed draws the same inputs, so a reported failure can be rerun."""
    for op_name, generate in GENERATORS.items():
        a, b = generate(random.Random(f"{op_name}-3"), "cpu"), generate(random.Random(f"{op_name}-3"), "cpu")
        assert a.name == b.name and a.error == b.error, op_name


def test_exchange_rejects_bad_input(one_rank_group):
    """The collectives' argument checks on one rank: each bad call raises naming the argument and the value."""
    F, g = torch.ops.fastmoe, one_rank_group
    x, counts = torch.randn(5, 3), torch.tensor([2, 3])
    cases = [
        (lambda: F.exchange_counts(counts.int(), g), "counts", "Int"),
        (lambda: F.exchange_counts(counts[None], g), "counts", "[1, 2]"),
        (lambda: F.exchange_counts(counts, "no-such-group"), "group_name", "'no-such-group'"),
        (lambda: F.exchange(x.int(), [5], [5], g, None), "x", "Int"),
        (lambda: F.exchange(x, [6], [6], g, None), "send_splits", "6"),
        (lambda: F.exchange(x, [-1], [5], g, None), "send_splits[0]", "-1"),
        (lambda: F.exchange(x, [5], [-3], g, None), "recv_splits[0]", "-3"),
        (lambda: F.exchange(x, [5], [5], g, 4), "out_rows", "4"),
        (lambda: F.exchange(x, [2, 3], [2, 3], g, None), "send_splits", "world_size=1"),
        (lambda: F.exchange(x, [2**63 - 1, 2], [0, 0], g, None), "send_splits", "2"),
        (lambda: F.exchange(x, [5], [5], "no-such-group", None), "group_name", "'no-such-group'"),
    ]
    for call, arg, value in cases:
        with pytest.raises(RuntimeError, match=mentions(arg, value)):
            call()
