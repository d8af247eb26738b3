#!/usr/bin/env bash
# The larger corpus of the GPU training run (docs/training.md): Debian's fortunes plus three more text packages
# from the distribution (jargon-text: the Jargon File; gnu-standards: the GNU coding standards and maintainers'
# guide; perl-doc: Perl's manual pages in POD), about 14 MB of English, packed as .deps/corpus-gpu.tar.xz for a
# GPU machine without network access. At GPU speed the fortunes corpus alone (2.4 MB) is read ~40 times in two
# minutes and both models overfit it.
# Usage: tools/make_gpu_corpus.sh   (needs apt-get download, dpkg-deb and the fortunes data in .deps/fortunes)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download jargon-text gnu-standards perl-doc >/dev/null 2>&1)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
corpus=$work/corpus-gpu
mkdir -p "$corpus"/{fortunes,jargon,gnu,perlpod}
cp -r .deps/fortunes/. "$corpus/fortunes/"
zcat "$work"/x/usr/share/doc/jargon-text/jargon.txt.gz > "$corpus/jargon/jargon.txt"
zcat "$work"/x/usr/share/doc/gnu-standards/standards.text.gz > "$corpus/gnu/standards.txt"
zcat "$work"/x/usr/share/doc/gnu-standards/maintain.text.gz > "$corpus/gnu/maintain.txt"
cp "$work"/x/usr/share/perl/*/pod/*.pod "$corpus/perlpod/"
mkdir -p .deps
tar -C "$work" -cJf .deps/corpus-gpu.tar.xz corpus-gpu
du -sh "$corpus" .deps/corpus-gpu.tar.xz
