"""Load on `mlxvid serve`: many concurrent loopback clients submit jobs while a job runs, and one client
polls `GET /v1/videos/{id}`; reports every submission's fate (accepted, or refused and why), lost or
duplicated jobs, the polling latency's percentiles, and the machine's load average before and after.

The polling client is a process of its own (as another program on the machine would be), so that its
latency is the server's and the machine's, not the wait for its own interpreter's GIL while the 20 submitting
threads run.

    python benchmarks/serve_load.py --model FOLDER [--submissions 200] [--clients 20] [--worker-nice N] [--job-size WxH]
                                    [--json out.json]

FOLDER is a converted model (a tiny one is fine: the server's own work is measured, not the model's). The
traffic stays on 127.0.0.1, is bounded in count, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.serve import ServeProcess, wait_for  # noqa: E402


def submit_all(url: str, n: int, clients: int) -> list[dict]:
    def one(i: int) -> dict:
        with httpx.Client(base_url=url, timeout=30) as client:
            start = time.perf_counter()
            r = client.post("/v1/videos", json={"prompt": f"load {i}", "size": "32x32", "frames": 5, "steps": 1,
                                                "seed": i})
            body = r.json()
            return {"i": i, "status": r.status_code, "id": body.get("id"), "seconds": time.perf_counter() - start,
                    "reason": (body.get("error") or {}).get("message")}

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(n)))


def poll_latencies(url: str, job_id: str, stop: threading.Event) -> list[float]:
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get(f"/v1/videos/{job_id}").raise_for_status()
            times.append(time.perf_counter() - start)
            time.sleep(0.01)
    return times


def poll_process(url: str, job_id: str, stop, results) -> None:
    """`poll_latencies` in a process of its own (multiprocessing, spawn); the latencies go to `results`."""
    results.put(poll_latencies(url, job_id, stop))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(model: Path, submissions: int, clients: int, max_queue: int, serve_options: list[str] = (),
        job_size: str = "64x64") -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        serve = ServeProcess(Path(tmp) / "data", [model], "--max-queue", str(max_queue), *serve_options).start()
        try:
            client = httpx.Client(base_url=serve.url, timeout=30)
            long = client.post("/v1/videos", json={"prompt": "the running job", "size": job_size, "frames": 9,
                                                   "steps": 1000}).json()["id"]
            wait_for(client, long, lambda j: j["status"] == "in_progress")
            context = multiprocessing.get_context("spawn")
            stop, polled = context.Event(), context.Queue()
            poller = context.Process(target=poll_process, args=(serve.url, long, stop, polled))
            poller.start()
            time.sleep(2.0)  # the poller's interpreter starts and polls a moment before the burst
            results = submit_all(serve.url, submissions, clients)
            time.sleep(1.0)  # keep polling a moment after the burst, the job still running
            stop.set()
            latencies = polled.get(timeout=60)
            poller.join()
            still_running = client.get(f"/v1/videos/{long}").json()["status"] == "in_progress"
            listed, after = [], None
            while True:
                page = client.get("/v1/videos", params={"limit": 100, "order": "asc", **({"after": after} if after else {})}).json()
                listed += [v["id"] for v in page["data"]]
                if not page["has_more"]:
                    break
                after = page["last_id"]
        finally:
            serve.stop()
    accepted = [r["id"] for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    return {
        "submissions": submissions, "clients": clients, "max_queue": max_queue, "accepted": len(accepted),
        "refused": len(refused), "refusal_reasons": sorted({f"{r['status']}: {r['reason']}" for r in refused}),
        "refused_without_reason": sum(1 for r in refused if not r["reason"]),
        "lost": len(set(accepted) - set(listed)), "duplicated": len(listed) - len(set(listed)),
        "job_running_throughout": still_running, "polls": len(latencies),
        "poll_p50_ms": 1000 * statistics.median(latencies), "poll_p99_ms": 1000 * percentile(latencies, 0.99),
        "poll_max_ms": 1000 * max(latencies),
        "submit_p50_ms": 1000 * statistics.median(r["seconds"] for r in results),
        "submit_p99_ms": 1000 * percentile([r["seconds"] for r in results], 0.99),
        "load_average_before": [round(v, 1) for v in load_before],
        "load_average_after": [round(v, 1) for v in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--submissions", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--max-queue", type=int, default=150)
    parser.add_argument("--worker-nice", type=int, default=None, help="pass --worker-nice N to mlxvid serve")
    parser.add_argument("--job-size", default="64x64",
                        help="WxH of the long job that runs while polling (larger: it outlasts a fast machine's burst)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    serve_options = [] if args.worker_nice is None else ["--worker-nice", str(args.worker_nice)]
    result = run(args.model, args.submissions, args.clients, args.max_queue, serve_options, args.job_size)
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
