"""The admission gate's priorities: low-priority requests are shed first, high-priority last."""

from __future__ import annotations

import pytest

from nacguard.errors import Overloaded
from nacguard.serving.admission import Admission, Gate, Priority


def _fill(gate: Gate, priority: Priority) -> list[Admission]:
    """Admit requests of ``priority`` until the gate refuses one."""
    admitted = []
    while True:
        try:
            admitted.append(gate.admit(priority))
        except Overloaded:
            return admitted


def test_each_priority_has_its_own_limit() -> None:
    gate = Gate(10, 1.0, low_share=0.5, normal_share=0.8)
    assert gate.limits == (5, 8, 10)
    assert len(_fill(gate, Priority.LOW)) == 5
    # Low is refused from here on, while normal and high still get in.
    assert len(_fill(gate, Priority.NORMAL)) == 3
    with pytest.raises(Overloaded):
        gate.admit(Priority.LOW)
    assert len(_fill(gate, Priority.HIGH)) == 2
    assert gate.in_progress == 10
    for priority in Priority:
        with pytest.raises(Overloaded) as refused:
            gate.check_capacity(priority)
        assert refused.value.retry_after == 1.0


def test_under_a_mixed_flood_refusals_come_in_priority_order() -> None:
    gate = Gate(15, 1.0, low_share=0.34, normal_share=0.67)
    refused: list[Priority] = []
    held = []
    # Arrivals cycle low, normal, high; nothing is answered while the flood lasts.
    for i in range(30):
        priority = Priority(i % 3)
        try:
            held.append(gate.admit(priority))
        except Overloaded:
            refused.append(priority)
    first_refusal = {p: refused.index(p) for p in Priority}
    assert (
        first_refusal[Priority.LOW] < first_refusal[Priority.NORMAL] < first_refusal[Priority.HIGH]
    )
    assert gate.in_progress == 15
    # Answering requests makes room again, first for high and normal, last for low.
    for admission in held[:6]:
        admission.close()
    assert gate.in_progress == 9
    with pytest.raises(Overloaded):
        gate.admit(Priority.LOW)
    gate.admit(Priority.NORMAL)


def test_shares_never_lock_a_priority_out() -> None:
    gate = Gate(1, 1.0, low_share=0.1, normal_share=0.1)
    assert gate.limits == (1, 1, 1)
    gate.admit(Priority.LOW).close()
    assert gate.in_progress == 0
