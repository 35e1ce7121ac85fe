#!/usr/bin/env bash
# Prepares a natural-text corpus for `msa train --corpus DIR` from Debian packages: the Python
# 3.11 documentation (reStructuredText sources) and part of the Linux 6.1 source tree
# (Documentation/ in reStructuredText, plus C from kernel/, mm/, lib/ and fs/ext4/). Writes
# DIR/train.txt and DIR/valid.txt, which msa_data's Corpus::load reads as the two splits.
#
# The packages are fetched with `apt-get download` (no root, nothing installed system-wide; about
# 150 MB, mostly the kernel tarball) and unpacked with dpkg-deb/tar into DIR/.cache. Files go to
# the valid split by a hash of their path (about 1 in 20), so no file straddles the splits and the
# split does not change when other files are added. Safe to re-run: with DIR/train.txt,
# DIR/valid.txt and a matching DIR/.stamp present it only prints the sizes; --force rebuilds.
# Not run by CI.
#
# Usage: bash scripts/prepare_corpus.sh [--out DIR] [--sources python,kernel] [--max-mb N] [--force]
#   --out DIR      output folder (default data/corpus under the repository)
#   --sources S    comma list of python, kernel (default both)
#   --max-mb N     stop adding files from a source after N MB of its text (default 64)
#   --keep-cache   keep the downloaded packages and unpacked trees in DIR/.cache
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$root/data/corpus"
sources="python,kernel"
max_mb=64
force=0
keep_cache=0
while (($#)); do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --sources) sources=$2; shift 2 ;;
    --max-mb) max_mb=$2; shift 2 ;;
    --force) force=1; shift ;;
    --keep-cache) keep_cache=1; shift ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) printf 'prepare_corpus: unknown argument %s (see --help)\n' "$1" >&2; exit 2 ;;
  esac
done
[[ $max_mb =~ ^[0-9]+$ && $max_mb -gt 0 ]] || { echo "prepare_corpus: --max-mb must be a positive integer" >&2; exit 2; }

say() { printf '==> prepare_corpus: %s\n' "$*"; }
die() { printf 'prepare_corpus: error: %s\n' "$*" >&2; exit 1; }
sizes() {
  for f in "$out/train.txt" "$out/valid.txt"; do
    printf '  %-40s %10d bytes\n' "$f" "$(stat -c %s "$f")"
  done
}

stamp="sources=$sources max_mb=$max_mb"
if ((!force)) && [[ -f $out/train.txt && -f $out/valid.txt && -f $out/.stamp ]] &&
   [[ $(cat "$out/.stamp") == "$stamp" ]]; then
  say "up to date ($stamp); --force rebuilds"
  sizes
  exit 0
fi

for tool in apt-get dpkg-deb tar xz cksum; do
  command -v "$tool" >/dev/null || die "$tool not found (this script needs a Debian system)"
done
mkdir -p "$out/.cache"
cache=$(cd "$out/.cache" && pwd)

# Downloads a package's .deb into the cache once and unpacks it into cache/<package>/.
unpack() {
  local pkg=$1
  if [[ ! -d $cache/$pkg ]]; then
    if ! ls "$cache"/"${pkg}"_*.deb >/dev/null 2>&1; then
      say "downloading $pkg"
      (cd "$cache" && apt-get download "$pkg") ||
        die "apt-get download $pkg failed (run 'sudo apt-get update' first?)"
    fi
    mkdir -p "$cache/$pkg.tmp"
    dpkg-deb -x "$cache"/"${pkg}"_*.deb "$cache/$pkg.tmp"
    mv "$cache/$pkg.tmp" "$cache/$pkg"
  fi
}

# Lists of files, one per line, in a stable (bytewise) order.
lists=()
IFS=, read -r -a wanted <<<"$sources"
for s in "${wanted[@]}"; do
  case "$s" in
    python)
      unpack python3.11-doc
      list="$cache/python.list"
      # The HTML build ships its reStructuredText sources as _sources/**/*.rst.txt.
      find "$cache/python3.11-doc" -path '*/_sources/*' -name '*.txt' -type f | LC_ALL=C sort >"$list"
      [[ -s $list ]] || die "no _sources/*.txt in python3.11-doc"
      lists+=("$list")
      ;;
    kernel)
      unpack linux-source-6.1
      tarball=$(ls "$cache"/linux-source-6.1/usr/src/linux-source-6.1*.tar.* 2>/dev/null | head -1)
      [[ -n $tarball ]] || die "no source tarball in linux-source-6.1"
      tree="$cache/linux-tree"
      if [[ ! -d $tree ]]; then
        say "extracting Documentation/ and kernel/ mm/ lib/ fs/ext4/ from $(basename "$tarball")"
        mkdir -p "$tree.tmp"
        tar -xf "$tarball" -C "$tree.tmp" --wildcards --no-anchored \
          '*/Documentation/*.rst' '*/kernel/*.c' '*/mm/*.c' '*/lib/*.c' '*/fs/ext4/*.c' '*/fs/ext4/*.h'
        mv "$tree.tmp" "$tree"
      fi
      list="$cache/kernel.list"
      { find "$tree" -path '*/Documentation/*' -name '*.rst' -type f
        find "$tree" \( -path '*/kernel/*' -o -path '*/mm/*' -o -path '*/lib/*' -o -path '*/fs/ext4/*' \) \
          -not -path '*/Documentation/*' \( -name '*.c' -o -name '*.h' \) -type f
      } | LC_ALL=C sort >"$list"
      [[ -s $list ]] || die "no files extracted from the kernel tarball"
      lists+=("$list")
      ;;
    *) die "unknown source '$s' (expected python or kernel)" ;;
  esac
done

# Concatenate: each file then a blank line; valid when cksum(path relative to the cache) % 20 == 0.
tmp_train="$out/train.txt.tmp" tmp_valid="$out/valid.txt.tmp"
: >"$tmp_train"
: >"$tmp_valid"
limit=$((max_mb * 1024 * 1024))
for list in "${lists[@]}"; do
  added=0
  files=0
  while IFS= read -r f; do
    ((added < limit)) || break
    rel=${f#"$cache"/}
    h=$(printf '%s' "$rel" | cksum | cut -d' ' -f1)
    if ((h % 20 == 0)); then target=$tmp_valid; else target=$tmp_train; fi
    # Control bytes other than tab/newline (form feeds in old sources) become spaces.
    tr '\000-\010\013-\037\177' ' ' <"$f" >>"$target"
    printf '\n\n' >>"$target"
    added=$((added + $(stat -c %s "$f")))
    files=$((files + 1))
  done <"$list"
  say "$(basename "$list" .list): $files files, $((added / 1024)) KiB"
done
mv "$tmp_train" "$out/train.txt"
mv "$tmp_valid" "$out/valid.txt"
printf '%s' "$stamp" >"$out/.stamp"
((keep_cache)) || rm -rf "$cache"
say "wrote $out"
sizes
