"""Turning speculation down where it does not pay, by measurement: per sequence and per step.

Per sequence: a verify step costs rows whether or not its drafts are accepted. A sequence whose recent
drafts were mostly rejected (an exponential average of its acceptance below ``MIN_ACCEPTANCE``) stops
drafting for a while, twice as long each time it fails again (up to ``MAX_PAUSE`` steps), and starts over
at its first accepted run: a summary that stops quoting its source costs nothing once it is paused.

Per step: extra rows are nearly free while a step is bound by reading the weights, and cost their full
compute once the batch is large enough to be bound by arithmetic. Where that point lies depends on the
model and the device, so it is measured rather than guessed: for each batch size (in powers of two) the
generated tokens per second of steps that verified drafts and of steps that did not are averaged, and a
batch size whose verify steps are slower than its plain ones stops speculating. One step in ``EXPLORE_EVERY``
takes the other choice, so that both rates stay measured (plain steps also come of themselves, whenever no
sequence finds a draft); until the plain rate is measured, one step in four is plain.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_ACCEPTANCE = 0.25
ACCEPTANCE_DECAY = 0.6  # weight of the past in a sequence's acceptance average
FIRST_PAUSE = 4
MAX_PAUSE = 64
RATE_DECAY = 0.8  # weight of the past in a batch size's tokens per second
MIN_SAMPLES = 3  # steps of each kind before their rates are compared
EXPLORE_EVERY = 64  # a plain step in a single stream that copies gives up some 3 tokens of 4
MARGIN = 0.97  # verify steps must reach this share of plain steps' tokens per second to go on


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

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.average = ACCEPTANCE_DECAY * self.average + (1 - ACCEPTANCE_DECAY) * num_accepted / num_drafted
        if self.average < MIN_ACCEPTANCE:
            self.pause_left = self.next_pause
            self.next_pause = min(2 * self.next_pause, MAX_PAUSE)
            self.average = MIN_ACCEPTANCE  # one good run after the pause lifts it back above
        elif num_accepted:
            self.next_pause = FIRST_PAUSE


@dataclass
class _Rate:
    tokens_per_second: float = 0.0
    samples: int = 0

    def add(self, value: float) -> None:
        self.tokens_per_second = (
            value if not self.samples else RATE_DECAY * self.tokens_per_second + (1 - RATE_DECAY) * value
        )
        self.samples += 1


class StepThroughput:
    """Per batch size: whether steps that verify drafts generate tokens faster than steps that do not."""

    def __init__(self) -> None:
        self._rates: dict[tuple[int, bool], _Rate] = {}
        self._steps: dict[int, int] = {}

    @staticmethod
    def _bucket(num_decodes: int) -> int:
        return max(num_decodes, 1).bit_length()

    def allows(self, num_decodes: int) -> bool:
        bucket = self._bucket(num_decodes)
        step = self._steps[bucket] = self._steps.get(bucket, 0) + 1
        plain, verify = self._rates.get((bucket, False)), self._rates.get((bucket, True))
        if verify is None or verify.samples < MIN_SAMPLES:
            return True
        if plain is None or plain.samples < MIN_SAMPLES:  # learn the plain rate soon: one step in four
            return step % 4 != 0
        pays = verify.tokens_per_second >= MARGIN * plain.tokens_per_second
        # Now and then the other choice, so that both rates stay measured as the load changes.
        return pays != (step % EXPLORE_EVERY == 0)

    def record(self, num_decodes: int, verified: bool, num_tokens: int, seconds: float) -> None:
        if seconds > 0 and num_decodes > 0:
            self._rates.setdefault((self._bucket(num_decodes), verified), _Rate()).add(num_tokens / seconds)
