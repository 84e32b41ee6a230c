"""A long fuzz of `tp-engine serve` with schemathesis, the standard OpenAPI tester, reading `/openapi.json`.

    python benchmarks/serve_fuzz.py [--examples 1000] [--nproc 2] [--max-model-len 64]

Starts ``tp-engine serve --nproc N`` on the bundled model, runs ``st run`` against its schema (all
phases it has: examples, coverage of the schema's edges, then random fuzzing of valid and invalid
bodies) with the check ``not_a_server_error``, then asks ``/health`` and sends one valid request.
Prints the cases schemathesis generated and their result; exits non-zero on any failure. The CI test
(tests/test_serve_fuzz.py) runs a two-minute slice of the same; this is the long run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import date

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000, help="schemathesis --max-examples per operation and phase")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=64, help="bounds each answer, so the run spends its time on requests")
    args = ap.parse_args()
    from tp_engine.spawn import free_port

    st = shutil.which("st") or os.path.join(os.path.dirname(sys.executable), "st")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "tp_engine", "serve", "--nproc", str(args.nproc), "--port", str(port),
                               "--max-model-len", str(args.max_model_len)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print(server.stderr.read()[-3000:])
                    return 1
                time.sleep(0.5)
        start = time.monotonic()
        run = subprocess.run([st, "run", url + "/openapi.json", "--checks", "not_a_server_error", "--mode", "all",
                              "--max-examples", str(args.examples), "--include-method", "POST"],
                             capture_output=True, text=True)
        seconds = time.monotonic() - start
        tail = run.stdout[-4000:]
        cases = re.search(r"(\d+) generated, (\d+) passed", tail)
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        answered = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["message"]["content"]
        print(tail)
        print("\n| date | ranks | cases generated | passed | seconds | server after | valid request |")
        print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
        print(f"| {date.today()} | {args.nproc} | {cases.group(1) if cases else '?'} | {cases.group(2) if cases else '?'} "
              f"| {seconds:.0f} | {health['status']} | answered ({answered!r}) |")
        return run.returncode
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
