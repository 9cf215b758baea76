"""A small HTTP endpoint for a saved classifier, and a load test for it: `mfkit serve MODEL_DIR`.

Routes: `GET /health` (the model and its decision rule) and `POST /predict` with `{"texts": ["...", ...]}`, which
answers `{"predictions": [{"label": ..., "positive_label": ..., "p_positive": ...}, ...]}` (for two classes:
`p_positive` is the probability of `positive_label`, whatever the label decided; with more classes each prediction
is `{"label": ..., "p_label": ...}`, the probability of that label). Concurrent requests are **batched**: a
single worker takes every text waiting in the queue (up to `max_batch`, after waiting at most `max_wait_ms` for
more to arrive) and runs one forward pass for all of them, so eight clients cost about one batch of eight, not
eight passes. Inputs are bounded (texts per request, characters per text); a bad request gets a 4xx with a
message and the server keeps serving.
"""

import asyncio
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import MfkitError, check_positive
from .predict import Predictor


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how the worker batches."""

    max_texts: int = 64
    max_chars: int = 20_000
    max_batch: int = 32
    max_wait_ms: float = 5.0


class Batcher:
    """Collects texts from concurrent requests and predicts them together in one worker thread."""

    def __init__(self, predictor: Predictor, limits: Limits) -> None:
        self.predictor, self.limits = predictor, limits
        self.queue: asyncio.Queue[tuple[str, asyncio.Future]] = asyncio.Queue()
        self.batches: list[int] = []  # size of every batch run, for the load test's report

    async def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        for text, future in zip(texts, futures, strict=True):
            self.queue.put_nowait((text, future))
        return list(await asyncio.gather(*futures))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while len(items) < self.limits.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            texts = [text for text, _ in items]
            try:
                results = await asyncio.to_thread(self.predictor.predict, texts, len(texts))
            except Exception as exc:  # one failed batch fails its requests, not the server
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches.append(len(texts))
            for (_, future), result in zip(items, results, strict=True):
                if not future.done():
                    future.set_result(result)


def _require_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MfkitError(
            f"mfkit serve needs FastAPI and uvicorn ({exc.name} is not installed).",
            "pip install 'mfkit[serve]' (or: pip install fastapi uvicorn).",
        ) from exc


def create_app(predictor: Predictor, limits: Limits | None = None) -> Any:
    """The FastAPI application serving `predictor` under `limits`."""
    _require_server_packages()
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    limits = limits or Limits()
    batcher = Batcher(predictor, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="mfkit classifier", lifespan=lifespan)
    app.state.batcher = batcher

    class Request(BaseModel):  # no `from __future__ import annotations` here: FastAPI must see this class
        texts: list[str]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "labels": predictor.labels,
            "positive_label": predictor.labels[predictor.positive] if len(predictor.labels) == 2 else None,
            "threshold": predictor.threshold,
            "max_texts": limits.max_texts,
            "max_chars": limits.max_chars,
            "batches_run": len(batcher.batches),
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        if not request.texts:
            raise HTTPException(422, "texts is empty: send at least one text.")
        if len(request.texts) > limits.max_texts:
            raise HTTPException(413, f"{len(request.texts)} texts; at most {limits.max_texts} per request.")
        too_long = [i for i, t in enumerate(request.texts) if len(t) > limits.max_chars]
        if too_long:
            raise HTTPException(
                413, f"text(s) {too_long[:5]} exceed {limits.max_chars} characters; shorten them."
            )
        return {"predictions": await batcher.predict(request.texts)}

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None) -> None:
    """Load the classifier in `model_dir` and serve it until interrupted."""
    _require_server_packages()
    import uvicorn

    predictor = Predictor.load(model_dir)
    uvicorn.run(create_app(predictor, limits), host=host, port=port, log_level="warning")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir: str, *options: str, start_timeout: float = 120.0) -> Iterator[str]:
    """`mfkit serve MODEL_DIR *options` in its own process on a free local port; yields its URL, stops it after.

    A server that exits before it listens raises `MfkitError` with the end of its error output.
    """
    port = free_port()
    command = [sys.executable, "-m", "mfkit.cli", "serve", str(model_dir), "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None:
                    message = process.stderr.read().decode(errors="replace")[-2000:]
                    raise MfkitError(
                        f"mfkit serve stopped before listening:\n{message}", "fix the error above."
                    ) from None
                if time.monotonic() > deadline:
                    raise MfkitError(
                        f"mfkit serve did not listen within {start_timeout:.0f} s.", "check the model folder."
                    ) from None
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


# --------------------------------------------------------------------------------------------------------------
# The load test


def post_json(url: str, payload: dict[str, Any], timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """POST `payload` as JSON; the status code and the decoded answer (also for 4xx/5xx answers)."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def get_json(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET `url` and decode its JSON answer (e.g. the server's `/health`, with its count of batches run)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.loads(answer.read())


def load_test(
    url: str, texts: Sequence[str], clients: int, requests_per_client: int, timeout: float = 30.0
) -> dict[str, float]:
    """`clients` concurrent clients each send `requests_per_client` one-text requests to `url/predict`.

    Returns the median and 99th-percentile latency (ms), requests per second over the whole test, and the
    number of failed requests.
    """
    check_positive("clients", clients)
    check_positive("requests_per_client", requests_per_client)
    if not texts:
        raise MfkitError("no texts for the load test.", "pass a few texts to send.")

    def client(k: int) -> list[tuple[float, bool]]:
        out = []
        for r in range(requests_per_client):
            text = texts[(k * requests_per_client + r) % len(texts)]
            start = time.perf_counter()
            status, _ = post_json(f"{url}/predict", {"texts": [text]}, timeout)
            out.append((time.perf_counter() - start, status == 200))
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - start
    latencies = sorted(1000 * t for t, _ in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {
        "clients": clients,
        "requests": len(results),
        "p50_ms": statistics.median(latencies),
        "p99_ms": p99,
        "requests_per_s": len(results) / wall,
        "failed": sum(not ok for _, ok in results),
    }
