#!/usr/bin/env python3
"""Helpers for bench/run.sh.

  report.py fio-iops JSON RW RUNTIME   print IOPS of a fio JSON result (exit 1 if it looks wrong)
  report.py caps NBDINFO_JSON SERVER   print capability lines (meta.tsv format)
  report.py rss-sample PID OUT         keep the max VmRSS (KiB) of PID's process tree in OUT
  report.py table RAW META SERVER... [--md FILE]
                                       print the median table, optionally write markdown
"""

import json
import math
import os
import statistics
import sys
import time

OURS = "flexnbd"
PEERS = ["nbdkit", "qemu-nbd"]

# key, label, higher_is_better
METRICS = [
    ("seq_read", "seq read (nbdcopy), MB/s", True),
    ("seq_write", "seq write (nbdcopy), MB/s", True),
    ("randread_qd1", "4K randread QD1, IOPS", True),
    ("randread_qd32", "4K randread QD32, IOPS", True),
    ("randwrite_qd1", "4K randwrite QD1, IOPS", True),
    ("randwrite_qd32", "4K randwrite QD32, IOPS", True),
    ("sparse_convert", "sparse qemu-img convert, s (lower is better)", False),
    ("rss_idle", "idle RSS, MiB (lower is better)", False),
    ("rss_load", "RSS under QD32 load (max), MiB (lower is better)", False),
    ("cpu_per_gib", "server CPU s per GiB seq moved (lower is better)", False),
    ("binary_size", "stripped binary size, MB (lower is better)", False),
    # Where the CPU went (% of one core over the run; no ratio): on a 2-core machine, a client
    # near 100% is the bottleneck whatever the server does.
    ("seq_read_client_cpu", "seq read: client (nbdcopy) CPU, % of a core", None),
    ("seq_read_server_cpu", "seq read: server CPU, % of a core", None),
    ("seq_write_client_cpu", "seq write: client (nbdcopy) CPU, % of a core", None),
    ("seq_write_server_cpu", "seq write: server CPU, % of a core", None),
    ("randread_qd32_client_cpu", "4K randread QD32: client (fio) CPU, % of a core", None),
    ("randread_qd32_server_cpu", "4K randread QD32: server CPU, % of a core", None),
    ("randwrite_qd32_client_cpu", "4K randwrite QD32: client (fio) CPU, % of a core", None),
    ("randwrite_qd32_server_cpu", "4K randwrite QD32: server CPU, % of a core", None),
]


def load_fio_json(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    # The nbd engine may print "fio: connected to NBD server" before the JSON.
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def fio_iops(path, rw, runtime):
    d = load_fio_json(path)
    jobs = d.get("jobs") or []
    if len(jobs) != 1:
        raise ValueError(f"expected 1 job, got {len(jobs)}")
    j = jobs[0]
    if j.get("error", 0) != 0:
        raise ValueError(f"fio job error {j['error']}")
    sect = j["read" if "read" in rw else "write"]
    other = j["write" if "read" in rw else "read"]
    iops = float(sect["iops"])
    ios = int(sect.get("total_ios", 0))
    run_ms = float(sect.get("runtime", 0))
    if ios <= 0 or iops <= 0 or run_ms <= 0:
        raise ValueError(f"no I/O done (total_ios={ios}, iops={iops}, runtime={run_ms} ms)")
    if int(other.get("total_ios", 0)) != 0:
        raise ValueError("I/O in the wrong direction")
    if int(sect.get("short_ios", 0)) or int(sect.get("drop_ios", 0)):
        raise ValueError("short or dropped I/Os")
    # Consistency: iops ~= total_ios / runtime, and the run lasted ~RUNTIME.
    if abs(iops - ios / (run_ms / 1000.0)) > 0.05 * iops + 1:
        raise ValueError(f"inconsistent iops {iops} vs {ios} ios in {run_ms} ms")
    if run_ms < 0.8 * runtime * 1000:
        raise ValueError(f"ran {run_ms} ms, expected ~{runtime} s")
    if int(sect.get("bw_bytes", 0)) and abs(sect["bw_bytes"] / 4096 - iops) > 0.05 * iops + 1:
        raise ValueError("bandwidth does not match 4 KiB * iops")
    return iops


def caps(path, server):
    d = json.load(open(path))
    ex = (d.get("exports") or [{}])[0]
    out = [
        ("multi-conn", "yes" if ex.get("can_multi_conn") else "no"),
        ("base:allocation", "yes" if "base:allocation" in (ex.get("contexts") or []) else "no"),
        ("structured replies", "yes" if d.get("structured") else "no"),
    ]
    for k, v in out:
        print(f"caps\t{server}:{k}\t{v}")


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "FAIL"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def metas_get(metas, key):
    for m in metas:
        if len(m) >= 3 and m[1] == key:
            return m[2]
    return "?"


def vals_for(vals, metric):
    return [(s, r, v) for (m, s), l in vals.items() if m == metric for r, v in l]


def table(raw, meta, servers, md_path):
    vals = {}  # (metric, server) -> [values by round]
    for line in open(raw):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 4:
            continue
        rnd, srv, m, v = parts
        vals.setdefault((m, srv), []).append((int(rnd), float(v)))
    metas = [l.rstrip("\n").split("\t") for l in open(meta) if l.strip()]

    def median(m, s):
        xs = [v for _, v in vals.get((m, s), [])]
        if not xs:
            return None
        if any(math.isnan(x) for x in xs):
            return float("nan")
        return statistics.median(xs)

    def ratio(m, peer):
        a, b = median(m, OURS), median(m, peer)
        if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
            return "-"
        return f"{a / b:.2f}x"

    header = ["metric"] + servers
    peers = [p for p in PEERS if p in servers]
    if OURS in servers:
        header += [f"ours/{p}" for p in peers]
    rows = []
    for key, label, hib in METRICS:
        row = [label] + [fmt(median(key, s)) for s in servers]
        if OURS in servers:
            row += [ratio(key, p) if hib is not None else "" for p in peers]
        rows.append(row)

    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))

    # Spread per metric/server, to judge noise: (max-min)/median in %.
    noisy = []
    for key, label, _ in METRICS:
        for s in servers:
            xs = [v for _, v in vals.get((key, s), [])]
            if len(xs) >= 2 and not any(math.isnan(x) for x in xs):
                med = statistics.median(xs)
                if med:
                    spread = (max(xs) - min(xs)) / med * 100
                    if spread > 15:
                        noisy.append(f"{key}/{s}: {spread:.0f}%")
    if noisy:
        print("\nnoisy (round spread (max-min)/median > 15%): " + ", ".join(noisy))

    failed = any(math.isnan(v) for lst in vals.values() for _, v in lst)
    badchecks = [f"{s} r{r}" for s, r, v in vals_for(vals, "data_check") if math.isnan(v)]
    if badchecks:
        print("\nDATA CHECK FAILED: " + ", ".join(badchecks))

    if md_path:
        with open(md_path, "w") as f:
            f.write("# flexnbd benchmark results\n\n")
            f.write("Generated by `bench/run.sh` (medians over rounds; ratios are flexnbd / peer:"
                    " above 1x is better for throughput/IOPS, below 1x is better for"
                    " \"lower is better\" rows).\n\n")
            f.write("| " + " | ".join(header) + " |\n")
            f.write("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|\n")
            for r in rows:
                f.write("| " + " | ".join(r) + " |\n")
            f.write("\n## Setup\n\n")
            for kind in ("settings", "versions"):
                for m in metas:
                    if m[0] == kind and len(m) >= 3:
                        f.write(f"- {m[1]}: `{m[2]}`\n")
            f.write(
                "\n## Notes\n\n"
                "- Warm page cache; every server serves its own copy of the same data on loopback."
                " In a round all servers are up and each test runs on each server back to back;"
                " the server order rotates each round.\n"
                "- Sequential read: `nbdcopy --no-extents nbd://... null:`; sequential write:"
                " `nbdcopy random.img nbd://...` (no flush). nbdcopy opens up to 4 connections"
                " (one copying thread each, at most one per CPU) when the server advertises"
                " multi-conn, and one otherwise, so these rows include that choice (see the"
                " capability table; flexnbd's `--multi-conn auto` leaves it off on 2 CPUs)."
                " Each round copies SEQ_REPS times each way per server (servers taking turns); the"
                " median is over every copy, and a round's column shows its own median.\n"
                "- Random I/O: fio `ioengine=nbd`, bs=4k, numjobs=1, time_based with ramp; the IOPS are"
                " checked for fio errors and internal consistency.\n"
                "- Sparse convert: `qemu-img convert -f raw -O raw` of a file that is 16 x 1 MiB of data and"
                " holes elsewhere; the output is compared with the source. Servers with"
                " base:allocation let qemu-img skip the holes.\n"
                "- RSS is VmRSS summed over the server's process tree; idle = after startup and one"
                " connection; load = max of 0.1 s samples during both QD32 fio runs.\n"
                "- CPU = utime+stime of the server across the sequential read and write, per GiB moved.\n"
                "- CPU rows in % of one core: the client's (its process tree, from the shell's"
                " children times) and the server's, each over the whole client run. Client plus"
                " server near 100% x cores means the machine was saturated; a client near 100% of"
                " its one busy thread is the limit for every server alike.\n"
                "- Binary size: stripped copies. flexnbd is a single binary; nbdkit = `nbdkit` + the"
                " file plugin `.so`, qemu-nbd = its executable, both without their shared libraries.\n")
            busy = [v for (m, _s), l in vals.items() if m == "busy_before" for _, v in l]
            if busy:
                f.write(f"- Whole-machine CPU busy just before each round (our servers idle): {min(busy):.0f}%"
                        f" to {max(busy):.0f}% (on {metas_get(metas, 'machine')}); more than a few % means"
                        " other work was running and the throughput/IOPS rows are noisy.\n")
            checks = vals_for(vals, "data_check")
            bad = [f"{s} r{r}" for s, r, v in checks if math.isnan(v)]
            if checks:
                f.write("- Data checks (warm-up read == served file, file == source after the sequential"
                        " write, sparse convert output == source): "
                        + ("all passed" if not bad and not any(
                            math.isnan(v) for _, v in sum((vals.get(("sparse_convert", s), []) for s in servers), []))
                           else "FAILED: " + ", ".join(bad)) + ".\n")
            capl = [m for m in metas if m[0] == "caps"]
            if capl:
                f.write("\n## Advertised capabilities (nbdinfo)\n\n")
                names = []
                for m in capl:
                    n = m[1].split(":", 1)[1]
                    if n not in names:
                        names.append(n)
                capd = {m[1]: m[2] for m in capl}
                f.write("| capability | " + " | ".join(servers) + " |\n")
                f.write("|---|" + "---|" * len(servers) + "\n")
                for n in names:
                    f.write(f"| {n} | " + " | ".join(capd.get(f"{s}:{n}", "?") for s in servers) + " |\n")
            f.write("\n## Per-round values\n\n")
            f.write("| metric | server | " + " | ".join(
                f"r{i}" for i in sorted({r for l in vals.values() for r, _ in l if r > 0})) + " |\n")
            rounds = sorted({r for l in vals.values() for r, _ in l if r > 0})
            f.write("|---|---|" + "---:|" * len(rounds) + "\n")
            for key, _, _ in METRICS:
                if key == "binary_size":
                    continue
                for s in servers:
                    # A round with several values (SEQ_REPS) shows their median.
                    byr = {}
                    for r, v in vals.get((key, s), []):
                        byr.setdefault(r, []).append(v)
                    byr = {r: statistics.median(v) for r, v in byr.items()}
                    f.write(f"| {key} | {s} | " + " | ".join(fmt(byr.get(r)) for r in rounds) + " |\n")
            if noisy:
                f.write("\nNoisy (round spread (max-min)/median > 15%): " + ", ".join(noisy) + "\n")
    return 1 if failed else 0


def tree_pids(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_rss_kib(pid):
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def rss_sample(pid, out, interval=0.1):
    """Write the max summed VmRSS (KiB) of PID's tree to OUT until PID exits or we are killed."""
    best = 0
    while os.path.exists(f"/proc/{pid}/status"):
        v = tree_rss_kib(pid)
        if v > best:
            best = v
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{best}\n")
            os.replace(tmp, out)
        time.sleep(interval)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[1]
    if cmd == "fio-iops":
        try:
            print(f"{fio_iops(argv[2], argv[3], float(argv[4])):.1f}")
        except Exception as e:  # noqa: BLE001
            print(f"fio result {argv[2]} rejected: {e}", file=sys.stderr)
            return 1
        return 0
    if cmd == "rss-sample":
        rss_sample(int(argv[2]), argv[3])
        return 0
    if cmd == "caps":
        caps(argv[2], argv[3])
        return 0
    if cmd == "table":
        args = argv[2:]
        md = None
        if "--md" in args:
            i = args.index("--md")
            md = args[i + 1] if i + 1 < len(args) else None
            args = args[:i] + args[i + 2:]
        raw, meta, servers = args[0], args[1], args[2:]
        return table(raw, meta, servers, md or None)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
