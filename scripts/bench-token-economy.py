#!/usr/bin/env python3
"""Prompt-cache economy on a real llama-server: the same shuffled batch under each scheduling
policy, and a bare client, on a fresh server per run (so no cache carries over).

    scripts/bench-token-economy.py [--repeats 2] [--lines 120] [--groups 1,8] [--cache-ram 0]

Needs the llama-server of scripts/llama-server.sh (.venv-llama) and a release build
(`cargo build --release`). For each number of groups (distinct ~1,300-token rubrics, lines
shuffled) and each policy, it reports the cached share (cached / prompt tokens, as llama.cpp
reports them), tokens prefilled (prompt - cached), the server's CPU seconds and the wall time:
medians over the repeats, which alternate the order of the policies (this 2-core machine is
noisy). Policies:
  input order  ollama-batch --scheduling fifo, the file as it is
  grouped      ollama-batch --scheduling fifo, the file sorted by rubric
  slot-affine  ollama-batch default (--scheduling affine, id_slot from /props)
  bare client  4 threads posting the file in order straight to llama-server
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, ".venv-llama", "bin", "llama-cpp-server")
MODEL = os.path.join(ROOT, "..", "shared", "models", "tiny-llama-random.gguf")
BINARY = os.path.join(ROOT, "target", "release", "ollama-batch")


def rubric(g):
    words = ["experience", "impact", "ownership", "systems", "design", "clarity", "mentoring",
             "delivery", "reliability", "testing", "security", "data", "scale", "teamwork"]
    rng = random.Random(g)
    s = f"Rubric {g}. Score the candidate from 0 to 10 on these criteria. "
    while len(s) < 5200:
        s += f"{rng.choice(words)} {rng.choice(words)} matters; "
    return s


def make_lines(groups, n, seed):
    lines = []
    for i in range(n):
        g = i % groups
        lines.append((g, f"Candidate {i}: {random.Random(i).randint(1, 30)} years, profile {i * 7919 % 1000}."))
    random.Random(seed).shuffle(lines)
    return lines


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for n, (g, user) in enumerate(lines):
            f.write(json.dumps({"custom_id": f"l{n}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tiny", "max_tokens": 8, "temperature": 0,
                                         "messages": [{"role": "system", "content": rubric(g)},
                                                      {"role": "user", "content": user}]}}) + "\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process and its children (llama-cpp-server execs llama-server)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def start_server(cache_ram):
    port = free_port()
    extra = ["--cache-ram", cache_ram] if cache_ram != "default" else []
    proc = subprocess.Popen([SERVER, "-m", MODEL, "--host", "127.0.0.1", "--port", str(port),
                             "--ctx-size", "8192", "--", "-np", "4", "-n", "8", "--alias", "tiny",
                             "-t", "2"] + extra,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if json.load(urllib.request.urlopen(url + "/health", timeout=1)).get("status") == "ok":
                return proc, url
        except Exception:
            time.sleep(0.1)
    stop_server(proc)
    sys.exit("llama-server did not start")


def stop_server(proc):
    """Kills the wrapper and the llama-server it started (one process group)."""
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        pass
    proc.wait()


def usage_sums(records):
    prompt = cached = 0
    for u in records:
        prompt += u.get("prompt_tokens", 0)
        cached += (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return prompt, cached


def run_ollama_batch(url, path, scheduling, work):
    out = os.path.join(work, "out")
    state = os.path.join(work, f"state-{time.time_ns()}")
    cmd = [BINARY, "run", path, "--backend", "openai", "--backend-url", url, "--model", "tiny",
           "--concurrency", "4", "--scheduling", scheduling, "--listen", "127.0.0.1:0",
           "--state", state, "--out", out, "--print-every", "1h", "--poll", "100ms"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ollama-batch run failed ({r.returncode}): {r.stderr}")
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(out, stem + ".output.jsonl")) as f:
        return [json.loads(l)["response"]["body"].get("usage", {}) for l in f]


def run_bare(url, path):
    bodies = [json.loads(l)["body"] for l in open(path)]
    results = [None] * len(bodies)
    nxt = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(bodies):
                return
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(bodies[i]).encode(),
                                         {"Content-Type": "application/json"})
            results[i] = json.load(urllib.request.urlopen(req, timeout=600)).get("usage", {})

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lines", type=int, default=120)
    ap.add_argument("--groups", default="1,8")
    ap.add_argument("--cache-ram", default="0", help="llama-server --cache-ram (MiB), or 'default'")
    a = ap.parse_args()
    for p in (SERVER, BINARY):
        if not os.path.exists(p):
            sys.exit(f"missing {p} (scripts/llama-server.sh builds the server; cargo build --release)")
    policies = ["input order", "grouped", "slot-affine", "bare client"]
    work = tempfile.mkdtemp(prefix="token-economy-")
    print(f"llama-server -np 4 -c 8192 (2,048 tokens a slot), --cache-ram {a.cache_ram}; "
          f"{a.lines} lines, max_tokens 8; medians of {a.repeats} alternated repeats\n")
    print("| groups | policy | cached share | tokens prefilled | server CPU s | wall s |")
    print("|---|---|---|---|---|---|")
    for groups in [int(g) for g in a.groups.split(",")]:
        lines = make_lines(groups, a.lines, seed=groups)
        shuffled = os.path.join(work, f"g{groups}.jsonl")
        write_jsonl(shuffled, lines)
        ordered = os.path.join(work, f"g{groups}-sorted.jsonl")
        write_jsonl(ordered, sorted(lines, key=lambda x: x[0]))
        cells = {p: [] for p in policies}
        for r in range(a.repeats):
            order = policies if r % 2 == 0 else list(reversed(policies))
            for policy in order:
                proc, url = start_server(a.cache_ram)
                try:
                    cpu0, t0 = cpu_seconds(proc.pid), time.time()
                    if policy == "input order":
                        usages = run_ollama_batch(url, shuffled, "fifo", work)
                    elif policy == "grouped":
                        usages = run_ollama_batch(url, ordered, "fifo", work)
                    elif policy == "slot-affine":
                        usages = run_ollama_batch(url, shuffled, "affine", work)
                    else:
                        usages = run_bare(url, shuffled)
                    wall, cpu = time.time() - t0, cpu_seconds(proc.pid) - cpu0
                finally:
                    stop_server(proc)
                prompt, cached = usage_sums(usages)
                cells[policy].append((cached / prompt if prompt else 0.0, prompt - cached, cpu, wall))
        for policy in policies:
            c = cells[policy]
            med = lambda i: statistics.median(x[i] for x in c)
            print(f"| {groups} | {policy} | {100 * med(0):.1f} % | {med(1):,.0f} | {med(2):.1f} | {med(3):.1f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
