"""Rates and ETAs that leave the first unit's compilation out."""

import math

from drig import progress


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_rate_and_eta_leave_out_the_first_unit():
  clock = FakeClock()
  meter = progress.Progress(total=100, clock=clock)
  assert meter.eta() == "?" and math.isnan(meter.rate())
  clock.now = 60.0  # the first step compiles for a minute
  meter.update(1)
  assert meter.eta() == "?"
  clock.now = 70.0  # then 10 steps in 10 s
  meter.update(11)
  assert meter.rate() == 1.0
  assert meter.eta() == "01m29s"


def test_format_eta():
  assert progress.format_eta(3723) == "1h02m03s"
  assert progress.format_eta(245) == "04m05s"
  assert progress.format_eta(-5) == "00m00s"
  assert progress.format_eta(float("nan")) == "?"
  assert progress.format_eta(float("inf")) == "?"
