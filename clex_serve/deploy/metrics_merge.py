"""Prometheus text from several replicas as one exposition: each sample gains a ``replica`` label, each
metric family's HELP and TYPE appear once, with every replica's samples of it together (as the text format
requires)."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)$")


def merge_metrics(scraped: list[tuple[str, str]]) -> str:
    families: dict[str, dict[str, list[str]]] = {}
    for replica, text in scraped:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                meta = families.setdefault(family, {"meta": [], "samples": []})["meta"]
                if line not in meta:
                    meta.append(line)
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue
            name, labels, rest = match.groups()
            label = f'replica="{replica}"'
            labels = f"{{{label},{labels[1:]}" if labels and labels != "{}" else f"{{{label}}}"
            families.setdefault(family or name, {"meta": [], "samples": []})["samples"].append(f"{name}{labels}{rest}")
    lines = []
    for entry in families.values():
        lines.extend(entry["meta"])
        lines.extend(entry["samples"])
    return "\n".join(lines) + "\n"
