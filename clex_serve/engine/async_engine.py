"""The asyncio engine for servers: the engine steps in its own thread; the event loop never waits for it.

- Submission: ``generate()`` tokenizes and checks the request in a worker thread (``asyncio.to_thread``),
  then posts it to an inbox that the engine thread drains between steps. Nothing on the event loop waits
  for a step, however long a prefill takes; a bad request is refused at once with a ``ValueError``.
- Outputs reach each consumer through a ``RequestStream`` that holds at most one pending output.
- ``abort()`` posts to the inbox too; the consumer still waiting gets a final output with
  ``finish_reason="abort"``. A consumer that goes away (a client disconnects) aborts its request.
- If a step raises, the requests of that step end with the error and the engine goes on with the others;
  an error that leaves the device unusable (a CUDA error) marks the engine dead: ``dead`` turns true, every
  pending request ends with ``EngineDeadError``, and new ones are refused with it.
- ``shutdown()`` stops the thread and ends every pending ``generate()`` with ``EngineShutdownError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from clex_serve.engine.engine_config import EngineConfig
from clex_serve.engine.errors import EngineDeadError, EngineShutdownError
from clex_serve.engine.input_processor import ProcessedPrompt
from clex_serve.engine.llm_engine import LLMEngine
from clex_serve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from clex_serve.engine.request_stream import RequestStream
from clex_serve.engine.stats import EngineStats
from clex_serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Add:
    request_id: str
    processed: ProcessedPrompt
    stream: RequestStream
    arrival_time: float


@dataclasses.dataclass
class _Abort:
    request_id: str


def _is_fatal(error: BaseException) -> bool:
    """Errors after which the device (and so every request) cannot be trusted: CUDA's are sticky."""
    text = f"{type(error).__name__}: {error}"
    return "CUDA error" in text or "CUBLAS_STATUS" in text or "AcceleratorError" in text


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, idle_wait: float = 0.5) -> None:
        self.engine = engine
        self._idle_wait = idle_wait
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # the engine thread's: requests it has admitted
        # The event loop's: ids of generate() calls in progress, those already posted to the engine thread,
        # and those aborted before they were posted (while their prompt was being tokenized).
        self._live_ids: set[str] = set()
        self._posted_ids: set[str] = set()
        self._aborted_early: set[str] = set()
        self._ids = itertools.count()
        self._stopping = False
        self._dead_error: BaseException | None = None
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="clex-serve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    # ------------------------------------------------------------------ state

    @property
    def dead(self) -> bool:
        """True once a step failed in a way that leaves the engine unusable (a server's /health reads this)."""
        return self._dead_error is not None

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping and not self.dead

    def stats(self) -> EngineStats:
        """The engine's load as of the end of its last step (read without waiting for the engine thread)."""
        return self._stats

    def _check_usable(self) -> None:
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead_error}")
        if self._stopping:
            raise EngineShutdownError("the engine is shut down")

    # ------------------------------------------------------------------ the model, for front ends

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def model_path(self):
        return self.engine.model_path

    def scale_for_length(self, num_tokens: int) -> int:
        """The CLEX scale ``t`` a prompt of ``num_tokens`` tokens runs at."""
        return self.engine.scale_for_length(num_tokens)

    def check_text_length(self, num_chars: int, what: str = "the prompt") -> None:
        """Refuse text that cannot fit the context whatever it says (``PromptTooLongError``), before it is
        tokenized."""
        self.engine.inputs.check_text_length(num_chars, what)

    async def process_inputs(self, prompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Tokenize and check a request off the event loop; ``generate`` takes the result as it is."""
        return await asyncio.to_thread(self.engine.process_inputs, prompt, params)

    def with_params(self, processed: ProcessedPrompt, params: SamplingParams) -> ProcessedPrompt:
        """A checked prompt with other sampling parameters, themselves checked against the model."""
        self.engine.inputs.check_params(params)
        grammar = processed.grammar
        if params.structured_outputs != processed.params.structured_outputs:
            # cached by its text: a lookup once compile_grammar has compiled it off the event loop
            grammar = self.engine.inputs.compile_grammar(params)
        return dataclasses.replace(processed, params=params, grammar=grammar)

    async def compile_grammar(self, params: SamplingParams):
        """Compile the output constraint of ``params`` in a worker thread (``GrammarError`` when it cannot
        be); later requests with the same constraint find it compiled."""
        return await asyncio.to_thread(self.engine.inputs.compile_grammar, params)

    # ------------------------------------------------------------------ requests

    async def generate(
        self, prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as it advances (what each carries follows ``params.output_kind``;
        a consumer that reads slowly gets what it missed merged into one output). The last one has
        ``finished``. Raises ValueError for a bad request; the engine thread's QueueFullError, when too many
        are waiting, arrives at the first read."""
        self._check_usable()
        request_id = f"async-{next(self._ids)}" if request_id is None else request_id
        if request_id in self._live_ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._live_ids.add(request_id)
        finished = False
        try:
            arrival = time.monotonic()
            if isinstance(prompt, ProcessedPrompt):  # already checked (process_inputs, with_params)
                if params is not None:
                    raise ValueError("a processed prompt carries its own sampling params")
                processed = prompt
            else:
                processed = await self.process_inputs(prompt, params)
            self._check_usable()
            if request_id in self._aborted_early:
                finished = True
                yield self._aborted_output(request_id, processed)
                return
            stream = RequestStream(request_id, asyncio.get_running_loop())
            self._inbox.put(_Add(request_id, processed, stream, arrival))
            self._posted_ids.add(request_id)
            self._wake.set()
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            self._live_ids.discard(request_id)
            self._aborted_early.discard(request_id)
            if not finished:  # the consumer went away (client disconnect, cancellation): free the blocks
                self.abort(request_id)
            self._posted_ids.discard(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its consumer, if still waiting, gets a final output with finish_reason "abort".
        Call it from the event loop's thread."""
        if request_id in self._live_ids and request_id not in self._posted_ids:
            self._aborted_early.add(request_id)  # still being tokenized: it will not be submitted
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    @staticmethod
    def _aborted_output(request_id: str, processed: ProcessedPrompt) -> RequestOutput:
        params = processed.params
        completions = [CompletionOutput(index, "", [], None, None, "abort") for index in range(params.n)]
        return RequestOutput(
            request_id,
            processed.text,
            processed.token_ids,
            None,
            completions,
            True,
            RequestMetrics(time.monotonic(), num_prompt_tokens=len(processed.token_ids)),
            params.output_kind,
        )

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after its current step; every pending generate() ends with
        EngineShutdownError."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=timeout)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            while not self._stopping and self._dead_error is None:
                self._drain_inbox()
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._wake.wait(timeout=self._idle_wait)
                    self._wake.clear()
        finally:
            self._end_all()

    def _inbox_items(self):
        """What was posted since the last look, in order."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for item in self._inbox_items():
            if isinstance(item, _Add):
                try:
                    self.engine.add_processed_request(item.processed, item.request_id, item.arrival_time)
                except Exception as error:  # a duplicate id, a full queue: the request's own error
                    item.stream.fail(error)
                    continue
                self._streams[item.request_id] = item.stream
            else:
                output = self.engine.abort_request(item.request_id)
                stream = self._streams.pop(item.request_id, None)
                if stream is not None and output is not None:
                    stream.put(output)  # finished, with finish_reason "abort" where it was running
        self._stats = self.engine.stats()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            self._step_failed(error)
            return
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)
            if output.finished:
                self._streams.pop(output.request_id, None)
        self._stats = self.engine.stats()

    def _step_failed(self, error: Exception) -> None:
        if _is_fatal(error):
            logger.error("engine step failed; the engine is dead: %s", error)
            self._dead_error = error
            return  # _end_all ends every request with EngineDeadError
        logger.error("engine step failed; ending the requests of that step: %s", error)
        failure = RuntimeError(f"generation failed: {error}")
        try:
            ended = self.engine.abort_step_requests()
        except Exception as abort_error:  # the engine's own state is broken: nothing else is safe
            self._dead_error = abort_error
            return
        if not ended:  # the failure is not tied to requests (the scheduler itself): retrying would loop
            self._dead_error = error
            return
        for output in ended:
            stream = self._streams.pop(output.request_id, None)
            if stream is not None:
                stream.fail(failure)

    def _end_all(self) -> None:
        """The thread is leaving: end every request it holds or has not yet admitted."""
        if self._dead_error is not None:
            error: BaseException = EngineDeadError(f"the engine stopped after an error: {self._dead_error}")
        else:
            error = EngineShutdownError("the engine was shut down")
        for item in self._inbox_items():
            if isinstance(item, _Add):
                item.stream.fail(error)
            else:
                self._streams.pop(item.request_id, None)
                try:
                    self.engine.abort_request(item.request_id)
                except Exception:
                    pass
        for request_id, stream in list(self._streams.items()):
            stream.fail(error)
            try:
                self.engine.abort_request(request_id)
            except Exception:  # shutting down after a failure: the streams are ended, that is what matters
                pass
        self._streams.clear()
