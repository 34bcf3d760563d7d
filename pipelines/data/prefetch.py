"""A background prefetch of batches (issue 23): a thread runs a batch generator up to `depth` batches ahead of
the training loop, so that gathering (and pinning) the next batch overlaps the device's step on the current one
instead of leaving the GPU idle in between. The consumer gets the batches in the generator's order, unchanged;
nothing random is drawn in the thread (the shuffling was drawn before it starts, the augmentation runs after).

The thread stops when the consumer stops: at the end, on `break`, on an exception or a KeyboardInterrupt in the
loop (the consuming generator's `finally`), within one queue timeout. An exception in the thread is raised in
the consumer. Imports nothing heavy.
"""

from __future__ import annotations

import queue
import threading

# how often a blocked side looks whether the other one stopped (s): the longest a shutdown waits
POLL_S = 0.05
THREAD_NAME = "ens-prefetch"


class Prefetch:
    """`with Prefetch(batches, depth) as it: for b in it: ...` — `batches` (an iterable) run in a thread."""

    def __init__(self, batches, depth: int = 2):
        self.batches, self.queue = batches, queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    def __enter__(self):
        self.thread.start()
        return iter(self)

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self.batches:
                if not self._put(("batch", batch)):
                    return  # the consumer stopped: drop the rest
            self._put(("end", None))
        except BaseException as e:  # raised again in the consumer
            self._put(("error", e))

    def __iter__(self):
        while True:
            try:
                kind, value = self.queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the prefetch thread ended without its last batch") from None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the batch it is gathering, then sees the stop)."""
        self.stop.set()
        while self.thread.is_alive():
            try:  # make room for a put in progress
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=POLL_S)
        self.batches = None


def prefetch_threads() -> list[threading.Thread]:
    """The prefetch threads alive now (for tests: none should outlive its loop)."""
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]
