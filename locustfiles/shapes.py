"""Locust: a LoadTestShape of steady, step and spike phases, to exercise autoscaling.

Run it instead of short_prompts.py (it brings the same users)::

    locust -f locustfiles/shapes.py --headless --host http://127.0.0.1:8000 --csv results/shape

The phases are a list ``KIND:SECONDS:USERS[:SPAWN_RATE]`` (``--shape`` / env HS_SHAPE):

- ``steady:120:4``     hold 4 users for 120 s;
- ``step:240:4-16:4``  4 equal steps of 60 s at 4, 8, 12 and 16 users;
- ``spike:30:32``      jump to 32 users at once (spawn rate = users) for 30 s.

Default: ``steady:120:4,step:240:4-16:4,spike:30:32,steady:120:4`` (recovery after the spike).
``--shape-scale 0.1`` multiplies every duration (short CI runs). The test stops after the last
phase; ``-u/-r/-t`` are ignored while a shape runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from locust import LoadTestShape, events

from short_prompts import ShortPromptUser  # noqa: F401  (locust picks up the users from here)

DEFAULT_SHAPE = "steady:120:4,step:240:4-16:4,spike:30:32,steady:120:4"


@dataclass(frozen=True)
class Phase:
    kind: str          # steady | step | spike
    seconds: float
    users_from: int
    users_to: int
    steps: int = 1
    spawn_rate: float | None = None


def parse_shape(spec: str, scale: float = 1.0) -> list[Phase]:
    phases = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        fields = part.split(":")
        kind = fields[0]
        try:
            seconds = float(fields[1]) * scale
            if kind == "step":
                lo, _, hi = fields[2].partition("-")
                steps = int(fields[3]) if len(fields) > 3 else 1
                rate = float(fields[4]) if len(fields) > 4 else None
                phase = Phase(kind, seconds, int(lo), int(hi or lo), max(1, steps), rate)
            elif kind in ("steady", "spike"):
                rate = float(fields[3]) if len(fields) > 3 else None
                phase = Phase(kind, seconds, int(fields[2]), int(fields[2]), 1, rate)
            else:
                raise ValueError(f"unknown phase kind {kind!r}")
        except (IndexError, ValueError) as exc:
            raise ValueError(f"bad shape phase {part!r} ({exc}); want steady:S:U, step:S:U1-U2:N "
                             f"or spike:S:U") from None
        if seconds <= 0 or phase.users_from < 0 or phase.users_to < 0:
            raise ValueError(f"bad shape phase {part!r}: durations > 0, users >= 0")
        phases.append(phase)
    if not phases:
        raise ValueError("empty shape")
    return phases


def users_at(t: float, phases: list[Phase]) -> tuple[int, float] | None:
    """(user count, spawn rate) at run time t, or None once every phase is over."""
    start = 0.0
    for p in phases:
        if t < start + p.seconds:
            if p.kind == "step":
                # levels users_from .. users_to in p.steps equal-length steps (first holds the start)
                i = min(int((t - start) // (p.seconds / p.steps)), p.steps - 1)
                frac = i / (p.steps - 1) if p.steps > 1 else 1.0
                users = round(p.users_from + (p.users_to - p.users_from) * frac)
                rate = p.spawn_rate or max(1.0, abs(p.users_to - p.users_from) / max(1, p.steps - 1))
            elif p.kind == "spike":
                users = p.users_to
                rate = p.spawn_rate or float(max(1, users))
            else:
                users = p.users_to
                rate = p.spawn_rate or float(max(1, users))
            return users, rate
        start += p.seconds
    return None


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    if "--shape" in getattr(parser, "_option_string_actions", {}):
        return
    g = parser
    g.add_argument("--shape", env_var="HS_SHAPE", default=DEFAULT_SHAPE,
                   help="phases KIND:SECONDS:USERS,... (default %(default)s)")
    g.add_argument("--shape-scale", env_var="HS_SHAPE_SCALE", type=float, default=1.0,
                   help="multiply every phase duration by this")


class SteadyStepSpikeShape(LoadTestShape):
    """Steady, step and spike phases from --shape (env HS_SHAPE)."""

    def __init__(self) -> None:
        super().__init__()
        self._phases: list[Phase] | None = None

    def phases(self) -> list[Phase]:
        if self._phases is None:
            opts = getattr(getattr(self, "runner", None), "environment", None)
            opts = getattr(opts, "parsed_options", None)
            spec = getattr(opts, "shape", None) or os.environ.get("HS_SHAPE", DEFAULT_SHAPE)
            scale = getattr(opts, "shape_scale", None) or float(os.environ.get("HS_SHAPE_SCALE", "1"))
            self._phases = parse_shape(spec, scale)
        return self._phases

    def tick(self):
        return users_at(self.get_run_time(), self.phases())
