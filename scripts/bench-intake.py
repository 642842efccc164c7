#!/usr/bin/env python3
"""Intake benchmark: upload and validate a large batch file and report the rates and the
server's peak memory.

Generates LINES chat lines (default 50,000) that share one system prompt of PROMPT_KB KiB
(default 8), starts the release binary on a fresh state directory (its backend points at a
closed port: nothing is dispatched, the backend is simply down), uploads the file with curl,
creates a batch and waits until validation ends. Prints upload and intake rates, the server's
peak resident memory (VmHWM from /proc) and how many shared contents the store holds.

    cargo build --release && scripts/bench-intake.py [LINES] [PROMPT_KB]
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

lines = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
prompt_kb = int(sys.argv[2]) if len(sys.argv) > 2 else 8
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.join(root, "target", "release", "ollama-batch")
if not os.path.exists(binary):
    sys.exit("build first: cargo build --release")

work = tempfile.mkdtemp(prefix="ob-intake-")
path = os.path.join(work, "in.jsonl")
system = ("Score this candidate from 1 to 10 against the rubric. " * 200)[: prompt_kb * 1024]
with open(path, "w") as f:
    for i in range(1, lines + 1):
        f.write(json.dumps({
            "custom_id": f"candidate-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gemma3:12b",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Candidate {i}: ten years of Rust, likes queues."},
                ],
                "max_tokens": 10,
            },
        }))
        f.write("\n")
size = os.path.getsize(path)

port = 4000 + os.getpid() % 1000
proc = subprocess.Popen(
    [binary, "serve", "--listen", f"127.0.0.1:{port}", "--state", os.path.join(work, "state"),
     "--backend", "openai", "--backend-url", "http://127.0.0.1:9"],
    stderr=open(os.path.join(work, "server.log"), "w"),
)
base = f"http://127.0.0.1:{port}"


def get(p):
    with urllib.request.urlopen(base + p) as r:
        return json.load(r)


def post(p, body):
    req = urllib.request.Request(base + p, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def vmhwm_mb():
    with open(f"/proc/{proc.pid}/status") as s:
        for line in s:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


try:
    for _ in range(200):
        try:
            get("/health")
            break
        except OSError:
            time.sleep(0.05)
    t0 = time.time()
    out = subprocess.run(
        ["curl", "-sS", "-F", "purpose=batch", "-F", f"file=@{path}", base + "/v1/files"],
        check=True, capture_output=True, text=True,
    ).stdout
    t_upload = time.time() - t0
    file_id = json.loads(out)["id"]
    t1 = time.time()
    batch = post("/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                 "completion_window": "24h"})
    while batch["status"] == "validating":
        time.sleep(0.05)
        batch = get(f"/v1/batches/{batch['id']}")
    t_intake = time.time() - t1
    status = get("/status")
    mb = size / 1e6
    print(f"file: {lines} lines, {mb:.1f} MB, shared system prompt {prompt_kb} KiB")
    print(f"upload: {t_upload:.2f} s = {mb / t_upload:.0f} MB/s")
    print(f"intake (validate + expand into the queue): {t_intake:.2f} s = "
          f"{lines / t_intake:.0f} lines/s, {mb / t_intake:.0f} MB/s; batch status {batch['status']}, "
          f"{batch['request_counts']['total']} requests queued")
    print(f"server peak RSS (VmHWM): {vmhwm_mb():.0f} MB")
    print(f"store: {status['shared_contents']} shared content(s), "
          f"{status['store_size_bytes'] / 1e6:.0f} MB on disk including the {mb:.0f} MB upload")
finally:
    proc.terminate()
    proc.wait(timeout=60)
    subprocess.run(["rm", "-rf", work])
