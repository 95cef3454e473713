#!/usr/bin/env python3
"""Keep a cargo profile folder down to what the last build used.

The build cache outlives the clone (scripts/test.sh keeps it under ~/.cache/meshguard/target), so
every change of Cargo.lock, of features or of the checkout's path leaves a full set of artifacts
behind; after a few weeks they fill the disk. Cargo has no stable garbage collector for the target
folder, but it names every artifact of a build in its JSON messages, fresh or not. This reads those
messages (files given as arguments, or stdin), keeps every unit hash they name, and removes from
PROFILE/deps and PROFILE/build whatever carries another hash, plus PROFILE/incremental. Cargo
rebuilds anything missing, so a sweep can cost time, never correctness.

    cargo test --no-run --workspace --all-targets --message-format=json > used.json
    python3 scripts/sweep-target.py "$CARGO_TARGET_DIR/debug" used.json
"""

import json
import os
import re
import shutil
import sys

HASH = re.compile(r"-([0-9a-f]{16})(?:\.|$)")


def unit_hash(path):
    """The 16-hex-digit unit hash in an artifact's file or folder name, if it has one."""
    match = HASH.search(os.path.basename(path.rstrip("/")))
    return match.group(1) if match else None


def used_hashes(lines):
    keep = set()
    artifacts = 0
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        reason = message.get("reason")
        paths = []
        if reason == "compiler-artifact":
            artifacts += 1
            paths = list(message.get("filenames") or [])
            if message.get("executable"):
                paths.append(message["executable"])
        elif reason == "build-script-executed":
            out_dir = message.get("out_dir")
            if out_dir:
                # PROFILE/build/NAME-HASH/out: the run's folder, not the script's.
                paths.append(os.path.dirname(out_dir.rstrip("/")))
        for path in paths:
            # Build scripts live in PROFILE/build/NAME-HASH/build-script-build.
            for part in (path, os.path.dirname(path)):
                found = unit_hash(part)
                if found:
                    keep.add(found)
    return keep, artifacts


def size_of(path):
    if os.path.islink(path) or not os.path.isdir(path):
        return os.lstat(path).st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove(path):
    size = size_of(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)
    return size


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    profile = argv[1]
    lines = []
    for name in argv[2:] or ["-"]:
        if name == "-":
            lines.extend(sys.stdin)
        else:
            with open(name, encoding="utf-8", errors="replace") as handle:
                lines.extend(handle)
    keep, artifacts = used_hashes(lines)
    if artifacts == 0 or not keep:
        # An empty or failed build names nothing: sweeping on it would empty the cache.
        print(f"sweep: no artifacts named in the build messages; {profile} left as it is", file=sys.stderr)
        return 1
    freed = 0
    removed = 0
    for sub in ("deps", "build"):
        folder = os.path.join(profile, sub)
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            found = unit_hash(entry)
            if found and found not in keep:
                freed += remove(os.path.join(folder, entry))
                removed += 1
    incremental = os.path.join(profile, "incremental")
    if os.path.isdir(incremental):
        freed += remove(incremental)
    print(f"sweep: kept {len(keep)} units, removed {removed} stale artifacts, {freed / 2**30:.1f} GiB freed in {profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
