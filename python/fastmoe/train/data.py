"""Training data: a text corpus read as bytes, split into train and validation, and a seeded window sampler.

The default corpus is the English text of Debian's ``fortunes`` package (``/usr/share/games/fortunes``),
installed by ``tools/ensure_system_deps.sh``; ``--data PATH`` takes any text file or folder instead. The
tokenizer is the identity on bytes (vocabulary 256), so nothing is downloaded or trained before training.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CORPUS = Path("/usr/share/games/fortunes")
VOCAB_SIZE = 256  # byte-level: token id = byte value
SPLIT_BLOCK_BYTES = 4096


class CorpusError(RuntimeError):
    """The corpus is missing, empty, or too small for the requested windows."""


def _is_text(blob: bytes) -> bool:
    # Binary files (fortune's .dat indexes, images, archives) contain NUL bytes; text files do not.
    return b"\x00" not in blob


def corpus_files(path: Path) -> list[Path]:
    """The text files of ``path``: the file itself, or every regular text file under the folder (recursively,
    sorted by relative path, symbolic links skipped so that aliases such as fortune's ``*.u8`` count once)."""
    if path.is_file():
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            file = Path(root) / name
            if file.is_symlink() or not file.is_file():
                continue
            files.append(file)
    return files


def read_corpus(path: str | os.PathLike | None = None) -> bytes:
    """The bytes of the corpus at ``path`` (default: :data:`DEFAULT_CORPUS`): one file, or the text files of a
    folder joined in sorted order. Raises :class:`CorpusError` naming the path when it is missing or empty."""
    default = path is None
    path = Path(DEFAULT_CORPUS if default else path)
    if not path.exists():
        hint = (
            "install Debian's 'fortunes' package (make system-deps, or apt-get install fortunes) or pass --data PATH"
            if default
            else "pass an existing text file or folder to --data"
        )
        raise CorpusError(f"corpus not found: {path} does not exist; {hint}")
    blobs = []
    for file in corpus_files(path):
        blob = file.read_bytes()
        if blob and _is_text(blob):
            blobs.append(blob if blob.endswith(b"\n") else blob + b"\n")
    data = b"".join(blobs)
    if not data:
        raise CorpusError(f"corpus at {path} holds no text (no non-empty file without NUL bytes)")
    return data


def split_corpus(data: bytes, val_fraction: float, block_bytes: int = SPLIT_BLOCK_BYTES) -> tuple[bytes, bytes]:
    """``(train, val)``: the corpus cut into blocks of ``block_bytes``; block ``i`` goes to validation when
    ``floor((i + 1) * val_fraction) > floor(i * val_fraction)``, which spreads the validation blocks evenly over
    the whole corpus (every file contributes) and gives ``round(num_blocks * val_fraction)`` of them. The two
    parts are disjoint and together are the corpus. Deterministic: no random state."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes!r}")
    num_blocks = (len(data) + block_bytes - 1) // block_bytes
    if num_blocks < 2:
        raise CorpusError(f"the corpus has {len(data)} bytes, too few to split into train and validation")
    train, val = [], []
    for i in range(num_blocks):
        block = data[i * block_bytes : (i + 1) * block_bytes]
        is_val = int((i + 1) * val_fraction) > int(i * val_fraction)
        (val if is_val else train).append(block)
    if not val:  # a tiny corpus with a tiny fraction: the last block validates
        val.append(train.pop())
    return b"".join(train), b"".join(val)


def to_tokens(data: bytes) -> torch.Tensor:
    """Byte-level tokens: ``uint8`` values as an int64 tensor ``[len(data)]``."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


@dataclass
class Corpus:
    train: torch.Tensor  # [N_train] int64 token ids
    val: torch.Tensor  # [N_val] int64 token ids
    source: str

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.val.numel()


def load_corpus(path: str | os.PathLike | None = None, val_fraction: float = 0.05) -> Corpus:
    data = read_corpus(path)
    train, val = split_corpus(data, val_fraction)
    source = str(DEFAULT_CORPUS if path is None else Path(path))
    return Corpus(train=to_tokens(train), val=to_tokens(val), source=source)


class WindowSampler:
    """Random training windows ``[batch, seq_len + 1]`` from one token stream, drawn by its own seeded
    generator, so that its state (saved in checkpoints) fixes every later batch."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if tokens.numel() < seq_len + 2:
            raise CorpusError(
                f"the training split has {tokens.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                "use a larger corpus or a shorter --seq-len"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``[batch, seq_len]`` int64 on the CPU; targets are inputs shifted by one."""
        high = self.tokens.numel() - self.seq_len - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=self.generator)
        window = self.tokens[starts[:, None] + self._offsets]
        return window[:, :-1], window[:, 1:]

    def reseed(self, seed: int) -> None:
        """Restarts the draws from ``seed`` (a run resumed with another number of processes, whose ranks have no
        saved sampler state)."""
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def validation_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """A fixed validation set ``[n, seq_len + 1]``: ``n = min(max_tokens // seq_len, available)`` windows spread
    evenly over the validation split (non-overlapping when the split is long enough). Deterministic."""
    available = tokens.numel() - seq_len - 1
    if available < 0:
        raise CorpusError(
            f"the validation split has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a larger corpus, a larger --val-fraction or a shorter --seq-len"
        )
    count = max(1, min(max_tokens // seq_len, tokens.numel() // (seq_len + 1)))
    starts = torch.linspace(0, available, count).round().to(torch.int64)
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]
