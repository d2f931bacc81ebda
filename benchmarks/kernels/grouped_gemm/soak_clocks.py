"""Lines up ladder 12's --soak-ms windows with nvidia-smi's samples (device-session.sh MOE_EP_SMI):
per window, the kernel's time a launch and the median SM clock, power and temperature over the
window less its first 300 ms (the clock settling).

  python3 soak_clocks.py LADDER_OUTPUT.txt SMI.csv.gz

nvidia-smi's timestamps are read as UTC (the GPU machine's clock), the windows' as ms since the epoch.
When the samples name each GPU (an index column), only GPU 0's are used: the ladder runs there.
"""
import csv
import datetime
import gzip
import re
import statistics
import sys

SETTLE_MS = 300


def read_samples(path):
    samples = []
    with gzip.open(path, "rt") as f:
        rows = csv.reader(f)
        head = [h.strip() for h in next(rows)]
        for row in rows:
            if len(row) != len(head):
                continue
            d = dict(zip(head, (x.strip() for x in row)))
            try:
                t = datetime.datetime.strptime(d["timestamp"], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
            except ValueError:
                continue
            if d.get("index", "0") != "0":
                continue
            samples.append((t.timestamp() * 1000, d))
    return head, samples


def median_of(rows, prefix):
    key = next((k for k in rows[0] if k.startswith(prefix)), None) if rows else None
    vals = []
    for d in rows:
        try:
            vals.append(float(d[key]))
        except (KeyError, TypeError, ValueError):
            pass
    return statistics.median(vals) if vals else float("nan")


def main():
    ladder, smi = sys.argv[1], sys.argv[2]
    head, samples = read_samples(smi)
    print(f"{len(samples)} nvidia-smi samples ({', '.join(head[1:])}); each window less its first {SETTLE_MS} ms")
    print(f"{'run':>22}  {'side':58} {'ms':>7} {'n':>4} {'MHz':>6} {'W':>6} {'degC':>5}")
    run = "?"
    for line in open(ladder):
        if line.startswith("--- ") and "--soak-ms" in line:
            only = re.search(r"--only (\d+)", line)
            shape = re.search(r"--K (\d+) --N (\d+)", line)
            run = f"only {only.group(1) if only else '-'} K{shape.group(1)} N{shape.group(2)}" if shape else f"only {only.group(1) if only else '-'}"
        m = re.search(r"soak \[(.*)\]: (\d+) launches, ([\d.]+) ms a launch, wall clock (\d+)\.\.(\d+)", line)
        if not m:
            continue
        a, b = int(m.group(4)) + SETTLE_MS, int(m.group(5))
        window = [d for t, d in samples if a <= t <= b]
        print(f"{run:>22}  {m.group(1)[:58]:58} {float(m.group(3)):7.3f} {len(window):4d} {median_of(window, 'clocks.current.sm'):6.0f} "
              f"{median_of(window, 'power.draw'):6.0f} {median_of(window, 'temperature'):5.0f}")


if __name__ == "__main__":
    main()
