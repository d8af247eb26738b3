"""The training program's corpus loader, train/validation split, window sampler and validation windows."""

import pytest
import torch

from fastmoe.train import data


def test_split_is_a_disjoint_partition_spread_over_the_corpus():
    corpus = bytes(range(256)) * 200  # 51,200 bytes = 12.5 blocks of 4 KiB
    train, val = data.split_corpus(corpus, val_fraction=0.25, block_bytes=4096)
    assert len(train) + len(val) == len(corpus)
    blocks = [corpus[i : i + 4096] for i in range(0, len(corpus), 4096)]
    # Blocks 3, 7 and 11 (every fourth) validate; the others train, in order.
    assert val == blocks[3] + blocks[7] + blocks[11]
    assert train == b"".join(b for i, b in enumerate(blocks) if i not in (3, 7, 11))


def test_split_is_deterministic_and_follows_the_fraction():
    corpus = torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    blob = bytes(corpus.tolist())
    first = data.split_corpus(blob, 0.05)
    assert first == data.split_corpus(blob, 0.05)
    num_blocks = -(-len(blob) // data.SPLIT_BLOCK_BYTES)
    assert len(first[1]) == round(num_blocks * 0.05) * data.SPLIT_BLOCK_BYTES


def test_tiny_corpus_still_gets_a_validation_block():
    train, val = data.split_corpus(b"x" * 100, val_fraction=0.01, block_bytes=10)
    assert len(val) == 10 and len(train) == 90


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_a_bad_fraction(fraction):
    with pytest.raises(ValueError, match=f"val_fraction must be in \\(0, 1\\), got {fraction}"):
        data.split_corpus(b"abc" * 1000, fraction)


def test_split_rejects_a_one_block_corpus():
    with pytest.raises(data.CorpusError, match="has 5 bytes"):
        data.split_corpus(b"hello", 0.5)


def test_folder_reads_text_files_sorted_skipping_binaries_and_links(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_text("third")
    (tmp_path / "a.dat").write_bytes(b"\x00\x01index")  # binary: skipped
    (tmp_path / "a.u8").symlink_to(tmp_path / "a.txt")  # alias: skipped
    (tmp_path / "empty").write_text("")
    assert data.read_corpus(tmp_path) == b"first\nsecond\nthird\n"


def test_single_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(b"caf\xc3\xa9")
    assert data.read_corpus(path) == b"caf\xc3\xa9\n"
    assert data.to_tokens(b"caf\xc3\xa9").tolist() == [99, 97, 102, 195, 169]


def test_missing_corpus_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.CorpusError, match=f"corpus not found: {missing} does not exist"):
        data.read_corpus(missing)


def test_missing_default_corpus_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEFAULT_CORPUS", tmp_path / "fortunes")
    with pytest.raises(data.CorpusError, match="fortunes does not exist; install Debian's 'fortunes' package"):
        data.read_corpus()


def test_folder_without_text_is_rejected(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x00")
    with pytest.raises(data.CorpusError, match="holds no text"):
        data.read_corpus(tmp_path)


@pytest.mark.skipif(not data.DEFAULT_CORPUS.exists(), reason="Debian's fortunes package is not installed")
def test_default_corpus_is_english_text():
    corpus = data.load_corpus()
    assert corpus.num_bytes > 1_000_000
    text = bytes(corpus.train[:20000].to(torch.uint8).tolist()).decode("utf-8", errors="replace")
    assert text.count(" the ") > 50
    assert 0.04 < corpus.val.numel() / corpus.num_bytes < 0.06


def test_sampler_windows_are_shifted_slices_and_resume_exactly():
    tokens = torch.arange(1000)
    sampler = data.WindowSampler(tokens, batch_size=4, seq_len=16, seed=3)
    inputs, targets = sampler.next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(inputs[:, 1:] - inputs[:, :-1], torch.ones(4, 15, dtype=torch.int64))
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    other = data.WindowSampler(tokens, batch_size=4, seq_len=16, seed=99)
    other.load_state_dict(state)
    for (a, b), (c, d) in zip(expected, [other.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_sampler_reaches_the_last_window():
    sampler = data.WindowSampler(torch.arange(10), batch_size=256, seq_len=8, seed=0)
    inputs, targets = sampler.next_batch()
    assert set(inputs[:, 0].tolist()) == {0, 1}  # the only two windows of 9 tokens in 10
    assert targets.max() == 9


def test_sampler_rejects_a_too_short_split():
    with pytest.raises(data.CorpusError, match="fewer than seq_len \\+ 2 = 18"):
        data.WindowSampler(torch.arange(17), batch_size=1, seq_len=16, seed=0)


def test_validation_windows_are_fixed_and_spread():
    tokens = torch.arange(10_000)
    windows = data.validation_windows(tokens, seq_len=99, max_tokens=990)
    assert windows.shape == (10, 100)
    assert windows[0, 0] == 0 and windows[-1, -1] == 9999
    assert torch.equal(windows, data.validation_windows(tokens, seq_len=99, max_tokens=990))
    with pytest.raises(data.CorpusError, match="fewer than seq_len \\+ 1 = 100"):
        data.validation_windows(torch.arange(50), seq_len=99, max_tokens=990)
