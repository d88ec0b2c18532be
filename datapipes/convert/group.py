"""`launcher data group`: one shard folder made of several converted ones (refer_seg = refcoco + refcoco+ +
...), by a manifest.json that lists the members' shards by relative path. No tar is copied; within the
group a member is read in proportion to its sample count.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from datapipes.convert.common import ConvertError
from datapipes.shards import FORMAT, MANIFEST, ManifestError, read_manifest


def write_group(out: str | os.PathLike, members: list[str | os.PathLike]) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise ConvertError(f"{out} holds shards of its own; a group folder only lists other folders' shards")
    shards, tasks, parts = [], Counter(), {}
    for member in members:
        try:
            m = read_manifest(member)
        except ManifestError as e:
            raise ConvertError(f"group member: {e}") from e
        for s in m["shards"]:
            shards.append({"url": os.path.relpath(s["url"], out), "count": s["count"]})
        tasks.update(m.get("tasks", {}))
        parts[os.path.relpath(member, out)] = m["total"]
    urls = [s["url"] for s in shards]
    if len(set(urls)) != len(urls):
        raise ConvertError("a folder is listed twice in the group")
    manifest = {"format": FORMAT, "shards": shards, "total": sum(s["count"] for s in shards),
                "tasks": dict(sorted(tasks.items())), "members": parts}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    read_manifest(out)  # the loader's own check: every listed shard exists
    return manifest
