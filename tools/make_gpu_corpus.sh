#!/usr/bin/env bash
# The larger corpus of the GPU training run (docs/training.md): Debian's fortunes plus six more text packages
# from the distribution (jargon-text: the Jargon File; gnu-standards: the GNU coding standards and maintainers'
# guide; perl-doc: Perl's manual pages in POD; python3.11-doc: the reStructuredText sources of Python's manuals;
# vim-runtime: Vim's help files; git-doc: Git's manuals in AsciiDoc), about 40 MB of English, packed as
# .deps/corpus-gpu.tar.xz for a GPU machine without network access. At GPU speed the fortunes corpus alone
# (2.4 MB) is read ~40 times in two minutes and both models overfit it.
# Usage: tools/make_gpu_corpus.sh   (needs apt-get download, dpkg-deb and the fortunes data in .deps/fortunes)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download jargon-text gnu-standards perl-doc python3.11-doc vim-runtime git-doc >/dev/null 2>&1)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
corpus=$work/corpus-gpu
mkdir -p "$corpus"/{fortunes,jargon,gnu,perlpod,python,vim,git}
cp -r .deps/fortunes/. "$corpus/fortunes/"
zcat "$work"/x/usr/share/doc/jargon-text/jargon.txt.gz > "$corpus/jargon/jargon.txt"
zcat "$work"/x/usr/share/doc/gnu-standards/standards.text.gz > "$corpus/gnu/standards.txt"
zcat "$work"/x/usr/share/doc/gnu-standards/maintain.text.gz > "$corpus/gnu/maintain.txt"
cp "$work"/x/usr/share/perl/*/pod/*.pod "$corpus/perlpod/"
# Python's manuals keep their folder structure: several folders hold files of the same name.
cp -r "$work"/x/usr/share/doc/python3.11/html/_sources/. "$corpus/python/"
cp "$work"/x/usr/share/vim/vim*/doc/*.txt "$corpus/vim/"
cp "$work"/x/usr/share/doc/git-doc/*.txt "$corpus/git/"
mkdir -p .deps
tar -C "$work" -cJf .deps/corpus-gpu.tar.xz corpus-gpu
du -sh "$corpus" .deps/corpus-gpu.tar.xz
