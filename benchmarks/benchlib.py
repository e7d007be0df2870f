"""Shared helpers of the benchmark scripts: cold caches, a hard memory cap, measured runs, the table.

usage: imported by run_bench.py and mergekit_compare.py (not run directly).

A measured run is a child process placed in a fresh cgroup-v1 memory cgroup whose
``memory.limit_in_bytes`` is the cap (a child of this session's own memory cgroup). Under
cgroup v1 the limit covers anonymous memory *and* the page cache the group touched, but clean
page cache is reclaimed when the group reaches the limit; only memory that cannot be reclaimed
(anonymous pages, dirty or in-writeback pages the kernel cannot free fast enough) makes the
kernel OOM-kill the run. While the child runs we sample the group's ``memory.stat`` every
20 ms (peaks of anonymous ``total_rss``, ``total_mapped_file``, ``total_dirty`` and
``total_writeback``) and read ``memory.max_usage_in_bytes``, ``memory.failcnt`` and the OOM
kill count at the end; ``/usr/bin/time -v`` wraps the command for the maximum RSS.
If the cgroup-v1 memory controller is not writable, ``systemd-run --scope -p MemoryMax=`` is
used instead (only /usr/bin/time's numbers are then available).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

GiB = 1 << 30
MiB = 1 << 20
V1_ROOT = "/sys/fs/cgroup/memory"
SAMPLE_SECONDS = 0.02
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- sizes and caches
def parse_size(text: str) -> int:
    """'1GiB' -> 1073741824, '512MiB', '2G' (binary units; 'none' -> 0 meaning no cap)."""
    t = text.strip().lower()
    if t in ("none", "0", "off"):
        return 0
    mt = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", t)
    if not mt:
        raise ValueError(f"cannot read size {text!r}")
    return int(float(mt.group(1)) * 1024 ** " kmgt".index(mt.group(2) or " "))


def size_label(nbytes: int) -> str:
    if not nbytes:
        return "none"
    return f"{nbytes / GiB:g}GiB" if nbytes % GiB == 0 else f"{nbytes / MiB:g}MiB"


def drop_caches() -> None:
    """Write dirty data back and empty the page cache (needs root), so the next run reads cold."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --------------------------------------------------------------------------- memory caps
def _own_v1_cgroup() -> str | None:
    """Path of this process's cgroup-v1 memory cgroup, if the controller is mounted and writable."""
    if not os.path.isfile(os.path.join(V1_ROOT, "cgroup.procs")):
        return None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if "memory" in ctrls.split(","):
                d = os.path.join(V1_ROOT, path.lstrip("/"))
                return d if os.access(d, os.W_OK) else None
    return None


def cap_mechanism() -> str:
    """'cgroup-v1' or 'systemd-run' (or 'none' when neither is available)."""
    if _own_v1_cgroup():
        return "cgroup-v1"
    return "systemd-run" if shutil.which("systemd-run") else "none"


class V1Group:
    """A throw-away cgroup-v1 memory cgroup with an optional hard limit."""

    def __init__(self, limit: int, name: str) -> None:
        parent = _own_v1_cgroup()
        if parent is None:
            raise RuntimeError("cgroup-v1 memory controller not writable")
        self.path = os.path.join(parent, name)
        if os.path.isdir(self.path):
            self.remove()
        os.mkdir(self.path)
        if limit:
            self._write("memory.limit_in_bytes", limit)
            try:  # no swap here, but make sure the cap also covers swap where there is some
                self._write("memory.memsw.limit_in_bytes", limit)
            except OSError:
                pass

    def _write(self, name: str, value: int) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(f"{value}\n")

    def read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def stat(self) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in self.read("memory.stat").splitlines())}

    def oom_kills(self) -> int:
        for line in self.read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def join_fn(self):
        """A ``preexec_fn`` that moves the forked child into this group before it execs."""
        procs = os.path.join(self.path, "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return join

    def remove(self) -> None:
        try:
            self._write("memory.force_empty", 0)
        except OSError:
            pass
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


# --------------------------------------------------------------------------- measured runs
@dataclass
class Measured:
    """What one capped run did (bytes unless stated)."""

    cmd: list[str]
    cap: int
    mechanism: str
    wall: float
    returncode: int
    max_rss: int = 0  # /usr/bin/time -v "Maximum resident set size" (anon + file-mapped)
    cpu_user: float = 0.0  # seconds, /usr/bin/time -v
    cpu_sys: float = 0.0
    major_faults: int = 0
    other_cpu: float = 0.0  # CPU seconds the rest of the machine used meanwhile (contention)
    peak_anon: int = 0  # sampled cgroup total_rss
    peak_mapped_file: int = 0  # sampled cgroup total_mapped_file
    peak_dirty: int = 0
    peak_writeback: int = 0
    cgroup_max_usage: int = 0  # memory.max_usage_in_bytes (anon + page cache, <= cap)
    failcnt: int = 0  # times the group hit its limit (reclaim)
    oom_kills: int = 0
    samples: int = 0
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        if self.oom_kills or self.returncode == -9:
            return "OOM-killed"
        return f"failed ({self.returncode})"


def _time_v(path: str) -> dict[str, str]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if ":" in line:
                    k, _, v = line.strip().rpartition(": ")
                    out[k] = v
    except OSError:
        pass
    return out


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


def run_capped(cmd: list[str], cap: int, *, cold: bool = True, env: dict | None = None,
               cwd: str | None = None, name: str = "cabs-bench") -> Measured:
    """Run ``cmd`` under a hard memory cap (0 = no cap, still measured) and measure it."""
    if cold:
        drop_caches()
    mech = cap_mechanism()
    tf = tempfile.NamedTemporaryFile(prefix="time-v-", suffix=".txt", delete=False)
    tf.close()
    full = ["/usr/bin/time", "-v", "-o", tf.name, *cmd]
    group = None
    preexec = None
    if mech == "cgroup-v1":
        group = V1Group(cap, f"{name}-{os.getpid()}")
        preexec = group.join_fn()
    elif mech == "systemd-run" and cap:
        full = ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={cap}", "-p", "MemorySwapMax=0", "--"] + full
    elif cap:
        raise RuntimeError("no way to cap memory here (no writable cgroup-v1 memory controller, no systemd-run)")
    peaks = dict.fromkeys(("total_rss", "total_mapped_file", "total_dirty", "total_writeback"), 0)
    samples = 0
    out_f = tempfile.TemporaryFile("w+")
    err_f = tempfile.TemporaryFile("w+")
    busy0 = _busy_seconds()
    t0 = time.monotonic()
    proc = subprocess.Popen(full, stdout=out_f, stderr=err_f, env=env, cwd=cwd, preexec_fn=preexec)
    try:
        while proc.poll() is None:
            if group is not None:
                try:
                    st = group.stat()
                    samples += 1
                    for k in peaks:
                        peaks[k] = max(peaks[k], st.get(k, 0))
                except OSError:
                    pass
            time.sleep(SAMPLE_SECONDS)
        wall = time.monotonic() - t0
        busy = _busy_seconds() - busy0
    except BaseException:
        proc.kill()
        proc.wait()
        if group is not None:
            group.remove()
        raise
    out_f.seek(0)
    err_f.seek(0)
    m = Measured(cmd=cmd, cap=cap, mechanism=mech if cap or mech == "cgroup-v1" else "none", wall=wall,
                 returncode=proc.returncode, stdout=out_f.read()[-20000:], stderr=err_f.read()[-20000:])
    tv = _time_v(tf.name)
    with open(tf.name) as f:
        sig = re.search(r"Command terminated by signal (\d+)", f.read())
    os.unlink(tf.name)
    m.max_rss = int(tv.get("Maximum resident set size (kbytes)", 0)) * 1024
    m.cpu_user = float(tv.get("User time (seconds)", 0))
    m.cpu_sys = float(tv.get("System time (seconds)", 0))
    m.major_faults = int(tv.get("Major (requiring I/O) page faults", 0))
    m.other_cpu = max(0.0, busy - m.cpu_user - m.cpu_sys)
    if sig:  # /usr/bin/time exits 128+N when its child died of signal N
        m.returncode = -int(sig.group(1))
    if group is not None:
        m.peak_anon, m.peak_mapped_file = peaks["total_rss"], peaks["total_mapped_file"]
        m.peak_dirty, m.peak_writeback = peaks["total_dirty"], peaks["total_writeback"]
        m.cgroup_max_usage = int(group.read("memory.max_usage_in_bytes"))
        m.failcnt = int(group.read("memory.failcnt"))
        m.oom_kills = group.oom_kills()
        m.samples = samples
        group.remove()
    return m


# --------------------------------------------------------------------------- the I/O floor
def io_floor(inputs: list[str], write_bytes: int, out_dir: str, cap: int) -> tuple[Measured, dict]:
    """Cold sequential read of every input file + write (and fsync) of ``write_bytes``, under ``cap``."""
    cmd = [sys.executable, os.path.join(HERE, "io_floor.py"), "--write-bytes", str(write_bytes),
           "--out-dir", out_dir, *inputs]
    m = run_capped(cmd, cap, cold=True, name="cabs-floor")
    if not m.ok:
        raise RuntimeError(f"I/O floor run failed ({m.status}): {m.stderr[-2000:]}")
    return m, json.loads(m.stdout.strip().splitlines()[-1])


def interleaved_options(p: argparse.ArgumentParser, family_help: str) -> None:
    """The options of the interleaved CABS benches (store_bench.py, lora_bench.py)."""
    p.add_argument("--family", required=True, help=family_help)
    p.add_argument("--cap", type=parse_size, default=GiB)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out-root", default="/work/bench-data/out")
    p.add_argument("--tag", default=None)


def runs_table(rows: "dict[str, list[Measured]]") -> list[str]:
    """A markdown table of interleaved runs: one line per kind, its median wall, every wall,
    median CPU, the most other CPU seen meanwhile, and the peaks."""
    lines = ["| run | wall (median) | runs | CPU user+sys (median) | other CPU meanwhile (max) | anon peak (max) "
             "| max RSS (max) |", "|---|---|---|---|---|---|---|"]
    for k, v in rows.items():
        cpu = statistics.median(x.cpu_user + x.cpu_sys for x in v)
        lines.append(f"| {k} | {statistics.median(x.wall for x in v):.1f} s | {', '.join(f'{x.wall:.1f}' for x in v)} "
                     f"| {cpu:.1f} s | {max(x.other_cpu for x in v):.1f} s | {max(x.peak_anon for x in v) / 2**20:.0f} "
                     f"MiB | {max(x.max_rss for x in v) / 2**20:.0f} MiB |")
    return lines


def save_runs(tag: str, text: str, doc: dict, rows: "dict[str, list[Measured]]") -> None:
    """``results/<tag>.md`` (``text``) and ``results/<tag>.json`` (``doc`` with every run's wall,
    CPU, other CPU and anon peak, and the machine)."""
    res = os.path.join(HERE, "results")
    with open(os.path.join(res, f"{tag}.md"), "w") as f:
        f.write(text)
    per = {"walls": "wall", "other_cpu": "other_cpu", "anon_peak": "peak_anon"}
    with open(os.path.join(res, f"{tag}.json"), "w") as f:
        json.dump({**doc, **{key: {k: [getattr(x, attr) for x in v] for k, v in rows.items()} for key, attr in per.items()},
                   "cpu": {k: [x.cpu_user + x.cpu_sys for x in v] for k, v in rows.items()},
                   "machine": machine_info()}, f, indent=2)


def family_files(dirs: list[str]) -> list[str]:
    """Every safetensors file of the given model folders."""
    return sorted(os.path.join(d, f) for d in dirs for f in os.listdir(d) if f.endswith(".safetensors"))


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# --------------------------------------------------------------------------- rows and the table
@dataclass
class Row:
    """One line of the results table."""

    family: str
    params: float  # billions
    k: int
    method: str
    cap: int
    wall: float
    floor: float
    bytes_moved: int  # bytes read + bytes written
    measured: Measured | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.wall / self.floor if self.floor else float("nan")

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.wall / 1e9 if self.wall else float("nan")

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "measured"}
        d.update(ratio=self.ratio, gbps=self.gbps, cap_label=size_label(self.cap))
        if self.measured is not None:
            md = asdict(self.measured)
            md.pop("stdout")
            md["stderr_tail"] = md.pop("stderr")[-2000:]
            d["measured"] = dict(md, status=self.measured.status)
        return d


COLUMNS = ("family", "k", "method", "cap", "wall s", "in-process s", "floor s", "ratio", "GB/s", "anon peak MiB",
           "file-mapped peak MiB", "max RSS MiB", "cgroup peak MiB", "status")


def _cells(r: Row) -> list[str]:
    m = r.measured
    mib = lambda b: f"{b / MiB:.0f}" if m is not None and b else "-"  # noqa: E731
    inproc = (r.extra.get("report_seconds") or {}).get("total")
    return [f"{r.family} ({r.params:.2f}B)", str(r.k), r.method, size_label(r.cap), f"{r.wall:.1f}",
            f"{inproc:.1f}" if inproc is not None else "-", f"{r.floor:.1f}", f"{r.ratio:.2f}", f"{r.gbps:.2f}",
            mib(m.peak_anon) if m else "-", mib(m.peak_mapped_file) if m else "-",
            mib(m.max_rss) if m else "-", mib(m.cgroup_max_usage) if m else "-",
            (m.status if m else "ok") + (f"; {r.note}" if r.note else "")
            + (f"; other processes used {m.other_cpu:.1f} CPU-s" if m and m.other_cpu > 0.25 * m.wall else "")]


def table(rows: list[Row]) -> str:
    """A markdown table (readable as plain text too)."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    fmt = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"  # noqa: E731
    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt(c) for c in cells[1:]])


def summary(rows: list[Row]) -> str:
    """Medians per (family, k, method, cap) over repeats: wall, in-process time, CPU, ratio."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.family, r.k, r.method, r.cap), []).append(r)
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    head = ["family", "k", "method", "cap", "runs", "median wall s", "median in-process s",
            "median CPU s (user+sys)", "median ratio"]
    cells = [head]
    for (fam, k, method, cap), rs in groups.items():
        ok = [r for r in rs if r.measured is None or r.measured.ok]
        inproc = [r.extra["report_seconds"]["total"] for r in ok if "report_seconds" in r.extra]
        cpu = [r.measured.cpu_user + r.measured.cpu_sys for r in ok if r.measured]
        cells.append([fam, str(k), method, size_label(cap), str(len(rs)), f"{med([r.wall for r in ok]):.1f}",
                      f"{med(inproc):.1f}" if inproc else "-", f"{med(cpu):.1f}",
                      f"{med([r.ratio for r in ok]):.2f}"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    fmt = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt(c) for c in cells[1:]])


def save_results(rows: list[Row], tag: str, header: dict, notes: list[str]) -> tuple[str, str]:
    """Write ``results/<tag>.json`` and ``results/<tag>.md``; returns their paths."""
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    jpath, mpath = os.path.join(out, f"{tag}.json"), os.path.join(out, f"{tag}.md")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump({**header, "rows": [r.as_dict() for r in rows], "notes": notes}, f, indent=2)
        f.write("\n")
    with open(mpath, "w", encoding="utf-8") as f:
        f.write(f"# {tag}\n\n")
        for k, v in header.items():
            f.write(f"- {k}: {v}\n")
        f.write("\n" + table(rows) + "\n")
        if len({(r.family, r.k, r.method, r.cap) for r in rows}) < len(rows):
            f.write("\n" + summary(rows) + "\n")
        if notes:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return jpath, mpath


def machine_info() -> dict:
    """What the numbers depend on: cores, memory, kernel, disk, mechanism."""
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return {"cpus": os.cpu_count(), "memory_gib": round(mem / GiB, 1), "kernel": os.uname().release,
            "cap_mechanism": cap_mechanism(), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
