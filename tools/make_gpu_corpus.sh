#!/usr/bin/env bash
# The larger corpus of the GPU training run (docs/training.md): Debian's fortunes plus more English text from the
# distribution's documentation packages, about 80 MB, packed as .deps/corpus-gpu.tar.xz for a GPU machine without
# network access. At GPU speed the fortunes corpus alone (2.4 MB) is read ~40 times in two minutes and both
# models overfit it. The dense model of the GPU run reads this corpus 1.6 times in 230 s (a 38 MB one, 3.4 times).
#   jargon-text      the Jargon File                  gnu-standards    GNU coding standards, maintainers' guide
#   perl-doc         Perl's manual pages (POD)        python3.11-doc   Python's manuals (reStructuredText)
#   vim-runtime      Vim's help files                 git-doc          Git's manuals (AsciiDoc)
#   linux-doc-6.1    the kernel's Documentation/ (reStructuredText and text; English, without translations/)
#   llvm-14-doc      LLVM's manuals (without the AMDGPU instruction tables)
#   cmake-doc, python-pandas-doc, python-sqlalchemy-doc, nodejs-doc   their manuals' sources (rst, Markdown)
# Usage: tools/make_gpu_corpus.sh
# Needs apt-get (with package lists: apt-get update), dpkg-deb, zcat, xz and tar, all part of a Debian base system
# but xz-utils, which it installs when missing and run as root; and the fortunes text, from .deps/fortunes or else
# /usr/share/games/fortunes (Debian's 'fortunes' package: make system-deps). Trees are copied with cp --parents,
# so nothing beyond coreutils and findutils is needed for that.
set -euo pipefail
cd "$(dirname "$0")/.."
die() {
  echo "make_gpu_corpus.sh: $*" >&2
  exit 1
}
missing=()
for tool in apt-get dpkg-deb zcat tar find; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
((${#missing[@]} == 0)) || die "needs ${missing[*]} (a Debian or Ubuntu system)"
if ! command -v xz >/dev/null 2>&1; then
  [[ $(id -u) -eq 0 ]] || die "needs xz: run as root to install it, or apt-get install xz-utils"
  echo "make_gpu_corpus.sh: installing xz-utils"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xz-utils || die "apt-get install xz-utils failed"
fi
fortunes=.deps/fortunes
[[ -d $fortunes ]] || fortunes=/usr/share/games/fortunes
[[ -f $fortunes/fortunes ]] ||
  die "the fortunes text is in neither .deps/fortunes nor /usr/share/games/fortunes: make system-deps (or apt-get install fortunes)"
packages=(jargon-text gnu-standards perl-doc python3.11-doc vim-runtime git-doc linux-doc-6.1 llvm-14-doc cmake-doc
  python-pandas-doc python-sqlalchemy-doc nodejs-doc)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One package at a time, so that a failure names the package (after apt-get's own message).
for package in "${packages[@]}"; do
  if ! (cd "$work" && apt-get download "$package") >"$work/apt.log" 2>&1; then
    cat "$work/apt.log" >&2
    die "apt-get download $package failed (no such package in this release's lists, or no network; apt-get update refreshes the lists)"
  fi
done
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x" || die "dpkg-deb -x $deb failed"; done
corpus=$work/corpus-gpu
mkdir -p "$corpus"/{fortunes,jargon,gnu,perlpod,python,vim,git,linux,llvm,cmake,pandas,sqlalchemy,node}
cp -r "$fortunes"/. "$corpus/fortunes/"
zcat "$work"/x/usr/share/doc/jargon-text/jargon.txt.gz > "$corpus/jargon/jargon.txt"
zcat "$work"/x/usr/share/doc/gnu-standards/standards.text.gz > "$corpus/gnu/standards.txt"
zcat "$work"/x/usr/share/doc/gnu-standards/maintain.text.gz > "$corpus/gnu/maintain.txt"
cp "$work"/x/usr/share/perl/*/pod/*.pod "$corpus/perlpod/"
# Python's manuals keep their folder structure: several folders hold files of the same name.
cp -r "$work"/x/usr/share/doc/python3.11/html/_sources/. "$corpus/python/"
cp "$work"/x/usr/share/vim/vim*/doc/*.txt "$corpus/vim/"
cp "$work"/x/usr/share/doc/git-doc/*.txt "$corpus/git/"
# Sphinx keeps each page's source as _sources/<page>.rst.txt; the folder structure is kept (names repeat).
keep_sources() {  # keep_sources <html folder> <corpus folder> [path pattern to leave out]
  (cd "$1/_sources" && find . -type f -name '*.txt' ! -path "${3:-/no/such/path}" -exec cp --parents -p -t "$2" {} +)
}
keep_sources "$work"/x/usr/share/doc/llvm-14-doc/html "$corpus/llvm" '*/AMDGPU/*'
keep_sources "$work"/x/usr/share/doc/cmake-data/html "$corpus/cmake"
keep_sources "$work"/x/usr/share/doc/python-pandas-doc/html "$corpus/pandas"
(cd "$work"/x/usr/share/doc/python-sqlalchemy-doc && find . -name '*.rst' -exec cp --parents -p -t "$corpus/sqlalchemy" {} +)
# The kernel's and Node's documents are gzipped one by one.
unzip_tree() {  # unzip_tree <folder> <corpus folder> <find name pattern...>
  local src=$1 dst=$2 f
  shift 2
  (cd "$src" && find . -path ./translations -prune -o -type f \( "$@" \) -print) | while read -r f; do
    mkdir -p "$dst/$(dirname "$f")"
    zcat "$src/$f" > "$dst/${f%.gz}"
  done
}
unzip_tree "$work"/x/usr/share/doc/linux-doc-6.1/Documentation "$corpus/linux" -name '*.rst.gz' -o -name '*.txt.gz'
unzip_tree "$work"/x/usr/share/doc/nodejs/api "$corpus/node" -name '*.md.gz'
mkdir -p .deps
XZ_OPT=-9e tar -C "$work" -cJf .deps/corpus-gpu.tar.xz corpus-gpu
du -sh "$corpus" .deps/corpus-gpu.tar.xz
