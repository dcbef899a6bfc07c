#!/usr/bin/env python3
"""Where a start's time goes: cw, crun and runc each started N times under the kernel's own
tracer (tracefs: process fork/exec/exit, mount and fcntl entries, a marker around each run), and
the median time of each step from the runtime's exec printed side by side. Tracepoints cost a
few microseconds a hit, not the ptrace stops of strace, so the steps keep their proportions.
bench/start.sh runs it after its timed rounds with PHASES=N (root; the same store and bundle):

    python3 bench/phases.py N CW_BINARY BENCH_DIR
"""
import os
import re
import statistics
import subprocess
import sys
import time

T = "/sys/kernel/tracing"
EVENTS = [
    "sched/sched_process_fork",
    "sched/sched_process_exec",
    "sched/sched_process_exit",
    "syscalls/sys_enter_mount",
    "syscalls/sys_enter_fcntl",
]
LINE = re.compile(r"^\s*(.+)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+)[:(]\s?(.*)$")
F_ADD_SEALS = "cmd: 0x409"


def put(path, text):
    with open(os.path.join(T, path), "w") as f:
        f.write(text)


def trace(n, cmd, settle):
    """Run cmd(i) n times with the events on; the trace's text. The tracer is left as found."""
    with open(os.path.join(T, "tracing_on")) as f:
        was_on = f.read().strip()
    put("tracing_on", "0")
    put("trace", "")
    put("buffer_size_kb", "16384")
    for e in EVENTS:
        put(f"events/{e}/enable", "1")
    put("tracing_on", "1")
    try:
        for i in range(n):
            put("trace_marker", f"RUN {i}")
            subprocess.run(cmd(i), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            put("trace_marker", f"END {i}")
            settle()
        put("tracing_on", "0")
        with open(os.path.join(T, "trace")) as f:
            return f.read()
    finally:
        for e in EVENTS:
            put(f"events/{e}/enable", "0")
        put("trace", "")
        put("tracing_on", was_on)


def steps(text, runtime):
    """Per run, the time of each step from the runtime's exec, in ms."""
    runs, cur = [], None
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        pid, t, ev, rest = int(m[2]), float(m[3]) * 1000, m[4], m[5]
        if ev == "tracing_mark_write":
            if rest.startswith("RUN"):
                cur = []
                runs.append(cur)
            elif rest.startswith("END"):
                cur = None
            continue
        if cur is not None:
            cur.append((pid, t, ev, rest))
    out = []
    for evs in runs:
        s, main, protected = {}, None, None
        for pid, t, ev, rest in evs:
            if ev == "sched_process_exec":
                fn = rest.split()[0].removeprefix("filename=")
                if fn.endswith("/" + runtime) and main is None:
                    main, s["exec"] = pid, t
                elif fn.startswith(("/proc/self/", "/dev/fd/")) and "container exec" not in s:
                    # the runtime again from its protected copy (cw: the monitor's sealed memfd;
                    # crun and runc: a read-only bind mount of their binary); runc execs twice
                    protected, s["protected exec"] = pid, t
                    s.pop("first fork", None)
                elif fn == "/bin/true":
                    s.setdefault("container exec", t)
            elif ev == "sys_fcntl" and F_ADD_SEALS in rest and "protected exec" not in s:
                s["sealed copy made"] = t
            elif ev == "sys_mount" and runtime == "cw" and pid == main and "protected exec" not in s:
                s.setdefault("cw: rootfs mounted", t)
            elif ev == "sched_process_fork" and pid == protected:
                s.setdefault("first fork", t)
            elif ev == "sched_process_exit" and "group_dead=true" in rest:
                if "container exec" in s and "container exit" not in s and pid != main:
                    s["container exit"] = t
                if pid == main:
                    s["runtime exit"] = t
        if "exec" in s and "runtime exit" in s:
            out.append({k: v - s["exec"] for k, v in s.items()})
    return out


ORDER = ["exec", "cw: rootfs mounted", "sealed copy made", "protected exec", "first fork",
         "container exec", "container exit", "runtime exit"]


def main():
    n, cw, w = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if not os.path.isdir(os.path.join(T, "events/sched")):
        print(f"phases: no tracefs at {T}: skipped")
        return

    def settle_cw():
        # the monitor's teardown after cw returned, never beside the next run (as bench/start.sh)
        t = time.monotonic()
        while os.listdir(f"{w}/store/runs"):
            if time.monotonic() - t > 10:
                sys.exit("phases: cw's teardown did not end within 10 s")
            time.sleep(0.0005)

    def nothing():
        pass

    cmds = {
        "cw": (lambda i: [cw, "--store", f"{w}/store", "run", "--pull", "never", "--image",
                          "127.0.0.1:5000/tiny:amd64", "--", "/bin/true"], settle_cw),
        "crun": (lambda i: ["crun", "run", "--bundle", f"{w}/bundle", f"cwp-crun-{i}"], nothing),
        "runc": (lambda i: ["runc", "run", "--bundle", f"{w}/bundle", f"cwp-runc-{i}"], nothing),
    }
    med = {}
    for name, (cmd, settle) in cmds.items():
        runs = steps(trace(n, cmd, settle), name)
        if not runs:
            sys.exit(f"phases: no complete run of {name} in the trace")
        med[name] = {k: statistics.median(r[k] for r in runs if k in r)
                     for k in ORDER if any(k in r for r in runs)}
    print(f"where a start's time goes (ms from the runtime's exec, median of {n} traced runs each;"
          " tracing adds to every column)")
    print(f"{'step':22}" + "".join(f"{k:>9}" for k in cmds))
    for k in ORDER:
        print(f"{k:22}" + "".join(f"{med[r][k]:9.2f}" if k in med[r] else f"{'-':>9}" for r in cmds))


if __name__ == "__main__":
    main()
