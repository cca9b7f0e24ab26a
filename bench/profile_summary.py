"""Summarise py-spy's raw (folded) stacks: the share of samples each function appears in.

    py-spy record --gil --nonblocking -f raw -o prof.folded -p <worker pid> -d 5
    python bench/profile_summary.py prof.folded [--top 30]
"""
from __future__ import annotations

import argparse
import re
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
# Frames every request passes through, which say nothing about where the time goes.
PLUMBING = {"threading.py", "thread.py", "_base.py", "gthread.py", "arbiter.py", "wsgiapp.py", "gunicorn"}


def frame_name(frame: str) -> str:
    """`func (file.py)` for one folded frame."""
    found = FRAME.match(frame.strip())
    return f"{found['func']} ({found['file'].rsplit('/', 1)[-1]})" if found else frame.strip()


def summarise(path: str) -> tuple[int, Counter, Counter]:
    """Total samples, and per function the samples it appears in (inclusive) and tops (self)."""
    total, inclusive, own = 0, Counter(), Counter()
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            names = [frame_name(f) for f in stack.split(";")]
            total += int(count)
            inclusive.update({name: int(count) for name in set(names)})
            own[names[-1]] += int(count)
    return total, inclusive, own


def report(path: str, top: int = 30) -> str:
    """The top functions by inclusive and by self share, as text."""
    total, inclusive, own = summarise(path)
    if not total:
        return f"{path}: no samples"
    lines = [f"{total} samples; inclusive share (function on the stack):"]
    shown = [(k, v) for k, v in inclusive.most_common() if k.rsplit(" (", 1)[-1].rstrip(")") not in PLUMBING]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in shown[:top]]
    lines.append("self share (function on top of the stack):")
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top // 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(report(args.path, args.top))
