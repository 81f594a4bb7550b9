"""Where an offline engine's step time goes: host time in each part of `EngineCore.step`, per step.

Wraps the parts of an `LLM`'s engine core with timers (instance attributes, nothing else changes): the scheduler's
`schedule` and `update_from_output`, the executor's `execute_model` (inputs + forward launch), `sample_tokens`
(sampling launch, grammar bitmask applied) and `get_output` (mostly the wait for the device), and the grammar's
`bitmask` (the structured-output fill). What is left of a step (proposers, stats) is `other_in_step`, and what the
`LLM` does between steps (detokenizing, stop strings, building outputs) is `outside_step`. Two waits are also
timed on their own, inside those parts: `inputs_wait` (in execute_model: the device had not yet read the previous
step's inputs, i.e. it is behind the host) and `fill_wait` (in other_in_step: a deferred bitmask fill still running
when the next step needs it). Three pieces of the constrained path are timed inside their parts as well:
`mask_buffer` (in bitmask: getting the rows to fill, the lent pinned buffer once the device has read it),
`fill_submit` (in bitmask: handing a deferred fill to its thread) and `mask_apply` (in sample_tokens: staging the mask
and launching its kernel).
On a host-bound engine (a small model at a large batch) these parts add up to the step time, so a slower mode's
extra milliseconds show up in the part that grew.
"""
from __future__ import annotations

import time
from typing import Any, Callable

PARTS = ("schedule", "execute_model", "bitmask", "sample_tokens", "get_output", "update_from_output")
WAITS = ("inputs_wait", "fill_wait")  # inside execute_model and other_in_step (not added to the parts' sum)
INSIDE = ("mask_buffer", "fill_submit", "mask_apply")  # inside bitmask and sample_tokens (not added either)


class StepBreakdown:
    """Counts an LLM's engine-core steps and times their parts; `take()` returns ms per step and starts over."""

    def __init__(self, llm: Any) -> None:
        engine = llm.engine
        self.steps = 0
        self._totals = dict.fromkeys(PARTS + WAITS + INSIDE + ("step",), 0.0)
        self._t0 = time.perf_counter()
        owners = {"schedule": engine.scheduler, "update_from_output": engine.scheduler,
                  "execute_model": engine.executor, "sample_tokens": engine.executor,
                  "get_output": engine.executor, "bitmask": getattr(engine, "grammar", None)}
        runner = getattr(engine.executor, "runner", None)  # in-process executors only
        manager = getattr(engine, "structured", None)
        waits = {"inputs_wait": (runner, "_wait_inputs_consumed"), "fill_wait": (engine, "_wait_fill"),
                 "mask_buffer": (manager, "_rows_buffer"),
                 "fill_submit": (getattr(manager, "_fill_pool", None), "submit"),
                 "mask_apply": (getattr(runner, "grammar_bitmask", None), "apply")}
        for name, owner in owners.items():
            if owner is not None and hasattr(owner, name):
                setattr(owner, name, self._timed(name, getattr(owner, name)))
        for name, (owner, attr) in waits.items():
            if owner is not None and hasattr(owner, attr):
                setattr(owner, attr, self._timed(name, getattr(owner, attr)))
        inner = engine.step

        def step() -> Any:
            self.steps += 1
            start = time.perf_counter()
            try:
                return inner()
            finally:
                self._totals["step"] += time.perf_counter() - start

        engine.step = step

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        totals = self._totals

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return wrapper

    def take(self) -> dict[str, float]:
        """ms per step of each part since the last take (or construction), with `steps`, `in_step` (the engine
        core's step), `other_in_step` and `outside_step` (wall time between steps)."""
        wall = time.perf_counter() - self._t0
        steps = max(self.steps, 1)
        out: dict[str, float] = {"steps": self.steps}
        for name in PARTS + WAITS + INSIDE:
            out[name] = round(1000 * self._totals[name] / steps, 4)
        out["in_step"] = round(1000 * self._totals["step"] / steps, 4)
        out["other_in_step"] = round(out["in_step"] - sum(out[name] for name in PARTS), 4)
        out["outside_step"] = round(1000 * (wall - self._totals["step"]) / steps, 4)
        self.steps = 0
        for name in self._totals:  # in place: the wrappers hold this dict
            self._totals[name] = 0.0
        self._t0 = time.perf_counter()
        return out
