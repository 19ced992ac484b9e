#!/usr/bin/env bash
# The data a lent GPU machine needs, in an ignored folder that the device call carries (carry: [".data"]).
# One call carries at most 64 MiB with the working tree: the whole chest_xray_224 set (36 MiB) for the
# training run, and of chest_xray_fullres (52 MiB, too much beside it) every k-th file in class and
# name order (k so that they fit in FULLRES_MIB, default 18: about a third of the files, both classes,
# sizes spread as in the whole set) for the loader and training-feed benchmarks, which repeat them
# (python -m benchmarks --min-images).
#   bash scripts/stage_device_data.sh            # -> .data/, then run(..., carry=[".data"])
# Env: SRC (default ../shared/data), DEST (default .data), FULLRES_MIB, CARRY_MIB (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SRC:-../shared/data}
DEST=${DEST:-.data}
FULLRES_MIB=${FULLRES_MIB:-18}
CARRY_MIB=${CARRY_MIB:-64}
[ -d "$SRC/chest_xray_224" ] && [ -d "$SRC/chest_xray_fullres" ] || {
  echo "error: $SRC must hold chest_xray_224/ and chest_xray_fullres/ (use SRC=...)" >&2; exit 2; }
[ "$(realpath -m "$DEST")" != "$(realpath "$SRC")" ] || { echo "error: DEST is SRC" >&2; exit 2; }
if [ "$DEST" = .data ] && git rev-parse --git-dir >/dev/null 2>&1; then
  git check-ignore -q .data/x || { echo "error: .data/ is not ignored by git; add '/.data/' to .gitignore" >&2; exit 2; }
fi
listing=$(cd "$SRC/chest_xray_fullres" && find . -type f -name '*.jpeg' -printf '%s %P\n' | sort -k2)
[ -n "$listing" ] || { echo "error: no .jpeg under $SRC/chest_xray_fullres" >&2; exit 2; }
rm -rf "$DEST"
mkdir -p "$DEST/chest_xray_fullres"
cp -r "$SRC/chest_xray_224" "$DEST/"
budget=$((FULLRES_MIB * 1024 * 1024))
total=$(awk '{ s += $1 } END { print s }' <<< "$listing")
stride=$(( (total + budget - 1) / budget ))  # every stride-th file: both classes, sizes as in the whole set
used=0
i=0
while read -r size name; do
  if [ $((i++ % stride)) -eq 0 ] && [ $((used + size)) -le "$budget" ]; then
    mkdir -p "$DEST/chest_xray_fullres/$(dirname "$name")"
    cp "$SRC/chest_xray_fullres/$name" "$DEST/chest_xray_fullres/$name"
    used=$((used + size))
  fi
done <<< "$listing"
data_bytes=$(du -sb "$DEST" | cut -f1)
# what travels beside it: tracked files and untracked ones git does not ignore (0 outside a checkout)
tree_bytes=$( (git ls-files -co --exclude-standard -z 2>/dev/null || true) | du -cb --files0-from=- 2>/dev/null \
             | tail -n 1 | cut -f1)
tree_bytes=${tree_bytes:-0}
n_fullres=$(find "$DEST/chest_xray_fullres" -type f | wc -l)
n_224=$(find "$DEST/chest_xray_224" -type f | wc -l)
echo "staged $DEST: chest_xray_224 $n_224 files, chest_xray_fullres $n_fullres files;" \
     "$((data_bytes / 1048576)) MiB + working tree $((tree_bytes / 1048576)) MiB (carry limit $CARRY_MIB MiB)"
if [ $((data_bytes + tree_bytes)) -gt $((CARRY_MIB * 1048576)) ]; then
  echo "error: too big to carry in one call; lower FULLRES_MIB" >&2
  exit 1
fi
