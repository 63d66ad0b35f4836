"""Turning speculation down where it does not pay, by measurement: per sequence and per step.

What a draft costs and what it buys are measured apart. Its cost is a row of the verify step: for each
batch size (in powers of two) the runner's time of steps without drafts gives the seconds of a plain
token, and steps with drafts give the seconds each drafted row adds on top. An extra row is nearly free
while a step is bound by reading the weights and costs as much as a plain token once the batch is bound by
arithmetic; where that point lies depends on the model, the context and the device, so it is measured
rather than guessed. What a draft buys is its sequence's acceptance (an exponential average of the share
of its drafts kept). A draft pays when its acceptance is at least the break-even: the seconds of a row over
the seconds of a plain token. A sequence below it stops drafting for a while, twice as long each time it
fails again (up to ``MAX_PAUSE`` steps), and starts over at its first accepted run; a batch size whose
break-even is past 1 (no draft could pay) stops speculating.

Cost and acceptance apart, because they answer different questions: a copy task whose first drafts miss
(the model does not quote at once) has cheap rows all the same, and it is only that sequence that waits.
Until both times are measured a batch size speculates, with one step in four plain; afterwards one step in
``EXPLORE_EVERY`` is plain, so that the plain time follows the context as it grows.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_ACCEPTANCE = 0.1  # the break-even never goes below this: a draft that is nearly never kept is noise
ACCEPTANCE_DECAY = 0.6  # weight of the past in a sequence's acceptance average
FIRST_PAUSE = 4
MAX_PAUSE = 64
TIME_DECAY = 0.8  # weight of the past in a batch size's times
MIN_SAMPLES = 3  # steps of each kind before a batch size's break-even is trusted
EXPLORE_EVERY = 64  # a plain step in a single stream that copies gives up some 3 tokens of 4
MARGIN = 0.97  # drafts must earn this share more than their rows cost


@dataclass
class SequenceAcceptance:
    average: float = 1.0
    pause_left: int = 0
    next_pause: int = FIRST_PAUSE

    def wants_drafts(self) -> bool:
        if self.pause_left > 0:
            self.pause_left -= 1
            return False
        return True

    def record(self, num_drafted: int, num_accepted: int, break_even: float = MIN_ACCEPTANCE) -> None:
        """A verification's outcome, against the acceptance a draft needs to pay (``StepCost.break_even``)."""
        threshold = max(break_even, MIN_ACCEPTANCE)
        self.average = ACCEPTANCE_DECAY * self.average + (1 - ACCEPTANCE_DECAY) * num_accepted / num_drafted
        if self.average < threshold:
            self.pause_left = self.next_pause
            self.next_pause = min(2 * self.next_pause, MAX_PAUSE)
            self.average = min(1.0, 1.5 * threshold)  # one good run after the pause lifts it back above
        elif num_accepted:
            self.next_pause = FIRST_PAUSE


@dataclass
class _Average:
    value: float = 0.0
    samples: int = 0

    def add(self, value: float) -> None:
        self.value = value if not self.samples else TIME_DECAY * self.value + (1 - TIME_DECAY) * value
        self.samples += 1


class StepCost:
    """Per batch size: the seconds of a plain token and of a drafted row, and the acceptance at which a draft
    pays (``break_even``)."""

    def __init__(self) -> None:
        self._token_seconds: dict[int, _Average] = {}  # steps without drafts: seconds / decodes
        self._row_seconds: dict[int, _Average] = {}  # steps with drafts: extra seconds / drafted rows
        self._steps: dict[int, int] = {}

    @staticmethod
    def _bucket(num_decodes: int) -> int:
        return max(num_decodes, 1).bit_length()

    def break_even(self, num_decodes: int) -> float:
        """The acceptance a draft needs to pay in a step of ``num_decodes`` (0 until measured)."""
        bucket = self._bucket(num_decodes)
        token, row = self._token_seconds.get(bucket), self._row_seconds.get(bucket)
        if token is None or row is None or min(token.samples, row.samples) < MIN_SAMPLES or token.value <= 0:
            return 0.0
        return row.value / token.value / MARGIN

    def allows(self, num_decodes: int) -> bool:
        """Whether a step of ``num_decodes`` decodes drafts: not where no draft could pay, and now and then
        not at all, so that the plain time stays measured."""
        bucket = self._bucket(num_decodes)
        step = self._steps[bucket] = self._steps.get(bucket, 0) + 1
        token = self._token_seconds.get(bucket)
        if token is None or token.samples < MIN_SAMPLES:  # learn the plain time soon: one step in four
            return step % 4 != 0
        pays = self.break_even(num_decodes) < 1.0
        return pays != (step % EXPLORE_EVERY == 0)

    def record(self, num_decodes: int, num_drafted: int, seconds: float) -> None:
        """A step's decodes, the drafted tokens it verified, and its time."""
        if seconds <= 0 or num_decodes <= 0:
            return
        bucket = self._bucket(num_decodes)
        token = self._token_seconds.setdefault(bucket, _Average())
        if not num_drafted:
            token.add(seconds / num_decodes)
        elif token.samples:
            extra = seconds - token.value * num_decodes
            self._row_seconds.setdefault(bucket, _Average()).add(max(extra, 0.0) / num_drafted)
