"""The backend contract's codes and named constants are the same in Python, C++ and Triton."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends.contract import Hyper, Kind, RegCode, begin_step, state_dtype, undo_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _cpp_enum(source: str, name: str) -> dict[str, int]:
    body = re.search(rf"enum class {name}\s*:\s*\w+\s*{{([^}}]*)}}", source).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(",") if item.strip())}


def _norm(name: str) -> str:
    """LinBreg / LINBREG, SparseGroup / SPARSE_GROUP: the same name."""
    return name.replace("_", "").upper()


def test_kind_and_reg_codes_equal_the_cpp_enums():
    source = _read("csrc", "bregman_math.h")
    assert {_norm(k): v for k, v in _cpp_enum(source, "Kind").items()} == {_norm(k.name): int(k) for k in Kind}
    assert {_norm(k): v for k, v in _cpp_enum(source, "Reg").items()} == {_norm(r.name): int(r) for r in RegCode}


def test_every_fused_regularizer_has_a_code():
    for reg in (bf.NoReg(), bf.L1(0.1), bf.L1Pos(0.1), bf.GroupL1L2(0.1), bf.KernelL1L2(0.1),
                bf.SparseGroupL1L2(0.1, 0.2)):
        assert RegCode.of(reg.kind) is not None, reg
    assert RegCode.of(bf.Nuclear(0.1).kind) is None  # reference only
    assert {r for r in RegCode if r.is_row_map} == {RegCode.GROUP, RegCode.SPARSE_GROUP}


def _cpp_step_params_fields() -> list[str]:
    body = re.search(r"struct StepParams\s*{([^}]*)}", _read("csrc", "bregman_math.h")).group(1)
    return re.findall(r"^\s*T\s+(\w+);", body, flags=re.M)


# C++ fields whose value is a Hyper constant of another name (the test maps them)
CPP_FIELD_TO_HYPER: dict[str, str] = {}  # none today: the names are the same


def test_cpp_step_params_are_hyper_constants():
    """Every field of bregman::StepParams is a named constant of contract.Hyper (a property or a
    function of the step count), so C++ and Python derive the same numbers under the same names."""
    h = Hyper.adabreg(0.1)
    fields = _cpp_step_params_fields()
    assert len(fields) >= 10, fields
    for field in fields:
        name = CPP_FIELD_TO_HYPER.get(field, field)
        assert hasattr(h, name), f"bregman::StepParams::{field} has no Hyper constant {name!r}"


def test_triton_codes_and_hyper_columns_are_the_contract_ones():
    pytest.importorskip("triton")
    from bregman_fused.backends.triton import bregman_math as tm

    for k in Kind:
        assert getattr(tm, f"KIND_{k.name}").value == int(k)
    for r in RegCode:
        assert getattr(tm, f"REG_{r.name}").value == int(r)
    h = Hyper.adabreg(0.1)
    for i, name in enumerate(tm.HYPER_COLUMNS):
        assert getattr(tm, f"HP_{name.upper()}").value == i
        assert hasattr(h, name), name
    assert tm.HP_COLS.value == len(tm.HYPER_COLUMNS)


def test_hyper_derived_constants():
    ada = Hyper.adabreg(1e-3, 0.9, 0.999, 1e-8, 2.0)
    assert ada.step_size(3.0) == 1e-3 / (1.0 - 0.9**3.0)
    assert ada.bc2_sqrt(3.0) == math.sqrt(1.0 - 0.999**3.0)
    assert ada.prox_delta == 2.0 and ada.thr_l1(0.5) == 0.5 and ada.thr_row(0.5, 9) == 0.5 * 3.0
    prox = Hyper.proxsgd(0.1)
    assert prox.prox_delta == 1.0 and prox.thr_l1(0.5) == 0.1 * 0.5 and prox.thr_row(0.5, 4) == 0.1 * (0.5 * 2.0)
    lin = Hyper.linbreg(0.1, momentum=0.9)
    assert lin.momentum and lin.uses_exp_avg and not lin.uses_exp_avg_sq and lin.mom_scale == (1.0 - 0.9) * 0.1
    assert not Hyper.linbreg(0.1).uses_exp_avg and not prox.uses_dual
    assert lin.step_size(1.0) == 0.0 and lin.bc2_sqrt(1.0) == 1.0


def test_kind_parse():
    assert Kind.parse("adabreg") is Kind.ADABREG and Kind.parse(Kind.LINBREG) is Kind.LINBREG
    with pytest.raises(ValueError, match="linbreg"):
        Kind.parse("adam")


def test_state_dtype_rule():
    for dtype, want in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        assert state_dtype(dtype) == want and state_dtype(torch.zeros(1, dtype=dtype)) == want


def test_step_policy_counts_and_skips():
    steps = [torch.zeros(()), torch.full((), 4.0)]
    assert begin_step(steps, None, False, False) == steps and [float(s) for s in steps] == [1.0, 5.0]
    assert begin_step(steps, torch.ones(()), False, False) is None  # skipped: nothing counted
    assert [float(s) for s in steps] == [1.0, 5.0]
    assert begin_step(steps, torch.zeros(()), False, False) and [float(s) for s in steps] == [2.0, 6.0]
    # capturable: no host decision, the counts move by found_inf == 0
    assert begin_step(steps, torch.ones(()), True, False) and [float(s) for s in steps] == [2.0, 6.0]
    assert begin_step(steps, torch.zeros(()), True, False) and [float(s) for s in steps] == [3.0, 7.0]
    # a compiled op adds the CPU counters itself ([note: who adds]): nothing moves here
    assert begin_step(steps, None, False, True) == [] and [float(s) for s in steps] == [3.0, 7.0]
    big = [torch.tensor(16777216.0)]
    begin_step(big, None, False, False)
    assert float(big[0]) == 16777216.0  # a float32 += 1, as the counters always counted: 2^24 + 1 rounds to 2^24
    undo_step(steps, torch.zeros(()), capturable=True)
    undo_step(steps, None, capturable=False)
    assert [float(s) for s in steps] == [1.0, 5.0]


@pytest.mark.parametrize("kind", ["linbreg", "adabreg", "proxsgd"])
def test_a_refused_functional_call_leaves_the_counts(kind):
    p = torch.randn(3, 4)
    states = bf.functional.init_states(kind, [p])
    fn = getattr(bf.functional, kind)
    with pytest.raises(Exception):
        fn([p], [torch.randn(5)], **states, lr=0.1, backend="reference")  # a grad of the wrong shape
    assert float(states["steps"][0]) == 0.0
