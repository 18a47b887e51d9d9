"""Short text for narrow terminals: paths shortened from the middle, so tables fit 80 columns."""

from __future__ import annotations

from pathlib import PurePath


def short_path(path: str | PurePath, width: int = 28) -> str:
    """`runs/sweeps/2024/ft3` as `runs/…/ft3`: the first part and as many last parts as fit in `width`."""
    text = str(path)
    if len(text) <= width:
        return text
    parts = PurePath(text).parts
    head, tail = (parts[0].rstrip("/") + "/" if len(parts) > 1 else ""), [parts[-1]]
    for part in reversed(parts[1:-1]):
        if len(head) + len("…/") + len("/".join([part, *tail])) > width:
            break
        tail.insert(0, part)
    short = head + "…/" + "/".join(tail)
    if len(short) <= width:
        return short
    keep = max(width - 1, 2)
    return text[: keep // 2] + "…" + text[len(text) - (keep - keep // 2):]
