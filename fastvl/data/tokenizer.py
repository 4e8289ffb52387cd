"""A local WordPiece tokenizer (HuggingFace ``tokenizers``): trained on the captions, or loaded from a directory
holding a BERT ``vocab.txt`` or a ``tokenizer.json``. Nothing is ever fetched from a hub.

Special tokens: ``[PAD]`` (id 0), ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``. ``encode`` lays every text out as
``[CLS] tokens [SEP] [PAD]...`` in a fixed length ``max_len`` (truncating the tokens, never [SEP]).
"""

from __future__ import annotations

import collections
import json
import os
import string
from collections.abc import Iterable, Sequence

import torch

# The Rust tokenizer's thread pool and DataLoader's fork do not mix; batches here are small anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError("fastvl.data.tokenizer needs the 'tokenizers' package: pip install tokenizers") from e
    return tokenizers


class Tokenizer:
    """WordPiece tokenizer with BERT's normalisation (lower-casing by default) and pre-tokenisation.

    Build with :meth:`train` (on captions), :meth:`load` (a directory or file saved by :meth:`save`, a BERT
    ``vocab.txt`` or a ``tokenizer.json``); keep it with a run via :meth:`save`.
    """

    def __init__(self, tok, *, lowercase: bool = True):
        self._tok = tok
        self.lowercase = lowercase
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"Tokenizer: the vocabulary lacks the special tokens {missing} (needs {SPECIAL_TOKENS})")
        if ids["[PAD]"] != 0:
            raise ValueError(f"Tokenizer: '[PAD]' must have id 0, got {ids['[PAD]']}")
        tok.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocabulary: ids unchanged
        self.pad_id, self.unk_id = ids["[PAD]"], ids["[UNK]"]
        self.cls_id, self.sep_id, self.mask_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1000, *, lowercase: bool = True, algorithm: str = "words"
    ) -> Tokenizer:
        """Build a WordPiece vocabulary from ``texts``: the specials (ids 0-4), every lower-case ASCII letter,
        digit and punctuation mark alone and as a ``##`` piece (so unseen ASCII words are spelled out instead
        of becoming [UNK]), then learnt entries up to ``vocab_size`` in total.

        ``algorithm="words"`` (default) learns whole words by frequency (ties alphabetical): deterministic, so
        every rank and every rerun gets the same ids. ``"wordpiece"`` runs the ``tokenizers`` WordPiece
        trainer (sub-word merges), whose tie-breaking varies between runs: train it once and :meth:`save` it.
        """
        tk = _tokenizers()
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("Tokenizer.train: 'texts' must be a non-empty iterable of strings")
        alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
        if not lowercase:
            alphabet += list(string.ascii_uppercase)
        base = list(SPECIAL_TOKENS) + alphabet + ["##" + ch for ch in alphabet]
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(base):
            raise ValueError(
                f"Tokenizer.train: 'vocab_size' must be an int > {len(base)} (the specials and characters), "
                f"got {vocab_size!r}"
            )
        if algorithm == "words":
            probe = cls._base(
                tk.models.WordPiece(vocab={t: i for i, t in enumerate(base)}, unk_token="[UNK]"), lowercase
            )
            counts: collections.Counter[str] = collections.Counter()
            for t in texts:
                norm = probe.normalizer.normalize_str(t)
                counts.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(norm))
            words = sorted((w for w in counts if w not in base), key=lambda w: (-counts[w], w))[
                : vocab_size - len(base)
            ]
            vocab = {t: i for i, t in enumerate(base + words)}
            return cls(cls._base(tk.models.WordPiece(vocab=vocab, unk_token="[UNK]"), lowercase), lowercase=lowercase)
        if algorithm != "wordpiece":
            raise ValueError(f"Tokenizer.train: 'algorithm' must be 'words' or 'wordpiece', got {algorithm!r}")
        tok = cls._base(tk.models.WordPiece(unk_token="[UNK]"), lowercase)
        trainer = tk.trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=1,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        vocab = tok.get_vocab()
        for piece in base:  # the trainer only learns "##c" for characters seen inside a word
            vocab.setdefault(piece, len(vocab))
        tok.model = tk.models.WordPiece(vocab=vocab, unk_token="[UNK]")
        return cls(tok, lowercase=lowercase)

    @staticmethod
    def _base(model, lowercase: bool):
        tk = _tokenizers()
        tok = tk.Tokenizer(model)
        tok.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        tok.decoder = tk.decoders.WordPiece()
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike, *, lowercase: bool | None = None) -> Tokenizer:
        """Load from a directory (``tokenizer.json`` preferred, else ``vocab.txt``) or from one of those files.
        ``lowercase`` applies to a ``vocab.txt`` (default True, or what :meth:`save` recorded)."""
        tk = _tokenizers()
        path = os.fspath(path)
        if os.path.isdir(path):
            meta = os.path.join(path, "fastvl_tokenizer.json")
            if lowercase is None and os.path.isfile(meta):
                with open(meta) as f:
                    lowercase = bool(json.load(f).get("lowercase", True))
            for name in ("tokenizer.json", "vocab.txt"):
                if os.path.isfile(os.path.join(path, name)):
                    return cls.load(os.path.join(path, name), lowercase=lowercase)
            raise FileNotFoundError(f"Tokenizer.load: {path} holds neither tokenizer.json nor vocab.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer.load: no such file or directory: {path}")
        lowercase = True if lowercase is None else lowercase
        if path.endswith(".json"):
            return cls(tk.Tokenizer.from_file(path), lowercase=lowercase)
        return cls(cls._base(tk.models.WordPiece.from_file(path, unk_token="[UNK]"), lowercase), lowercase=lowercase)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` and a BERT-style ``vocab.txt`` into ``directory``; returns the directory."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t, _ in vocab)
        with open(os.path.join(directory, "fastvl_tokenizer.json"), "w") as f:
            json.dump({"lowercase": self.lowercase, "vocab_size": self.vocab_size}, f)
        return directory

    # ---- use --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, texts: Sequence[str], max_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` (B strings) -> ``(ids int64 (B, max_len), mask bool (B, max_len))``: ``[CLS] ... [SEP]``
        then ``[PAD]`` (id 0); ``mask`` is True on real tokens ([CLS] and [SEP] included)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Tokenizer.encode: 'texts' must be a list of strings")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"Tokenizer.encode: 'max_len' must be an int >= 2 ([CLS] and [SEP]), got {max_len!r}")
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        ids = torch.zeros(len(texts), max_len, dtype=torch.int64)
        lengths = torch.empty(len(texts), dtype=torch.int64)
        for b, e in enumerate(encs):
            row = [self.cls_id, *e.ids[: max_len - 2], self.sep_id]
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
            lengths[b] = len(row)
        mask = torch.arange(max_len) < lengths[:, None]
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"

    def __getstate__(self):
        return {"json": self._tok.to_str(), "lowercase": self.lowercase}

    def __setstate__(self, state):
        tk = _tokenizers()
        self.__init__(tk.Tokenizer.from_str(state["json"]), lowercase=state["lowercase"])
