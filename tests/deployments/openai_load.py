"""Closed-loop load for the Serve tests: client threads sending completions with the
``openai`` client until stopped, every outcome kept. A 429 is a refusal before
acceptance (the client backs off and retries); a 503 that says to retry is the clear
error a request gets when its replica dies; anything else, and a malformed 200, is a
failure. Client timeouts bound every request, so a hung request fails the test."""

from __future__ import annotations

import threading
import time
from collections import Counter

import openai

REQUEST_TIMEOUT_S = 90.0


class Load:
    def __init__(self, url: str, model: str, num_clients: int, max_tokens: int,
                 pause_s: float = 0.0, allow_503: bool = False):
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                    timeout=REQUEST_TIMEOUT_S)
        self.model, self.max_tokens, self.pause_s = model, max_tokens, pause_s
        self.allow_503 = allow_503
        self.outcomes: Counter = Counter()
        self.failures: list[str] = []
        self.errors_503: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(num_clients)]
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        while not self._stop.is_set():
            self._one(seed)
            time.sleep(self.pause_s)

    def _one(self, seed: int) -> None:
        try:
            out = self.client.completions.create(model=self.model, prompt=f"Request {seed} says",
                                                 max_tokens=self.max_tokens, seed=seed)
        except openai.RateLimitError:
            self.outcomes["429"] += 1
            time.sleep(0.2)
            return
        except openai.APIStatusError as exc:
            if self.allow_503 and exc.status_code == 503 and "retry" in exc.message:
                self.outcomes["503"] += 1
                self.errors_503.append(exc.message)
                time.sleep(0.2)
                return
            self.failures.append(f"{exc.status_code}: {exc.message}")
            return
        except Exception as exc:  # noqa: BLE001 - timeouts and the rest are failures
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        choice = out.choices[0]
        if (choice.finish_reason in ("length", "stop") and out.usage.completion_tokens
                and isinstance(choice.text, str)):
            self.outcomes["ok"] += 1
        else:
            self.failures.append(f"malformed 200: {out}")

    def stop(self) -> None:
        """Stop and join every client; fails if one is still waiting on a request."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 30)
        assert not any(t.is_alive() for t in self._threads), "a request hung"
