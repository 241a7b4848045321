import inspect
import itertools
import json
import textwrap

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from llama_jax import data
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

DOCS = [f"document {i}: " + "word " * (i * 7 % 40) + f"end {i}" for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    corpus = inspect.getsource(textwrap).splitlines() + DOCS
    return str(train_sentencepiece(iter(corpus), tmp_path_factory.mktemp("tok") / "tok", vocab_size=400))


def write_formats(root) -> dict[str, list[str]]:
    """The DOCS in every supported format (two files each), plus a text-file corpus."""
    paths = {"text": [], "jsonl": [], "parquet": [], "arrayrecord": []}
    for i, doc in enumerate(DOCS):
        (root / f"doc{i:03d}.txt").write_text(doc)
        paths["text"].append(str(root / f"doc{i:03d}.txt"))
    for part, docs in enumerate((DOCS[:25], DOCS[25:])):
        jsonl = root / f"part{part}.jsonl"
        jsonl.write_text("".join(json.dumps({"id": i, "text": d}) + "\n\n" for i, d in enumerate(docs)))
        parquet = root / f"part{part}.parquet"
        pq.write_table(pa.table({"text": docs}), parquet, row_group_size=7)
        arrayrecord = root / f"part{part}.arrayrecord"
        writer = ArrayRecordWriter(str(arrayrecord), "group_size:1")
        for d in docs:
            writer.write(d.encode())
        writer.close()
        for kind, path in (("jsonl", jsonl), ("parquet", parquet), ("arrayrecord", arrayrecord)):
            paths[kind].append(str(path))
    return paths


def test_every_format_reads_the_same_documents(tmp_path):
    for kind, paths in write_formats(tmp_path).items():
        docs = data.open_documents(paths)
        assert [docs[i] for i in range(len(docs))] == DOCS, kind
        shuffled = docs.shuffle(3)
        assert sorted(shuffled[i] for i in range(len(docs))) == sorted(DOCS), kind


def test_expand_globs(tmp_path):
    write_formats(tmp_path)
    files = data.expand(f"{tmp_path}/doc00*.txt, {tmp_path}/*.jsonl")
    assert [f.rsplit("/", 1)[1] for f in files] == [f"doc00{i}.txt" for i in range(10)] + ["part0.jsonl", "part1.jsonl"]
    with pytest.raises(data.DataError, match="matches no file"):
        data.expand(f"{tmp_path}/*.txt,{tmp_path}/nothing*")


@pytest.mark.parametrize(
    "name, content, fmt, message",
    [
        ("bad.parquet", b"not parquet at all", "auto", "cannot read Parquet"),
        ("bad.jsonl", b"{not json}\n", "auto", "not a JSON object"),
        ("nofield.jsonl", b'{"body": "x"}\n', "auto", "field 'text'"),
        ("bad.arrayrecord", b"garbage" * 100, "auto", "cannot read ArrayRecord"),
    ],
)
def test_unreadable_data_is_a_data_error(tmp_path, name, content, fmt, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.open_documents([str(tmp_path / name)], fmt)


def test_parquet_without_the_column(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(data.DataError, match="no column 'text'"):
        data.open_documents([str(tmp_path / "x.parquet")])


def test_default_corpus_is_the_standard_library_without_tests():
    files = data.stdlib_files()
    assert len(files) > 300
    assert any(f.endswith("/json/decoder.py") for f in files)
    assert not any("/test/" in f or "/site-packages/" in f or f.rsplit("/", 1)[1].startswith("test_") for f in files)


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    paths = write_formats(tmp_path)["text"]
    corpus = data.load_corpus(",".join(paths), "", 0.1, "auto", "text", seed=1)
    train, held = ({c[i] for i in range(len(c))} for c in (corpus.train, corpus.eval))
    assert len(held) == 6 and len(train) == 54 and not train & held
    again = data.load_corpus(",".join(paths), "", 0.1, "auto", "text", seed=1)
    assert {again.eval[i] for i in range(6)} == held


def test_packed_rows(tokenizer):
    tok = load_tokenizer(tokenizer)
    docs = grain.MapDataset.source(DOCS[:12])
    batches = list(itertools.islice(data.packed_batches(docs, tokenizer, seq_len=32, batch_size=2), 3))
    assert set(batches[0]) == {"tokens", "targets", "positions", "segment_ids", "loss_mask"}
    assert all(v.shape == (2, 32) and v.dtype == np.int32 for v in batches[0].values())
    # Cut the rows back into their documents: BOS text EOS, shifted by one within each document.
    rebuilt: list[list[int]] = []
    for b in batches:
        for row in range(2):
            segments = b["segment_ids"][row]
            assert np.all(np.diff(segments[segments > 0]) >= 0) and np.all(b["loss_mask"][row] == (segments > 0))
            for s in np.unique(segments[segments > 0]):
                at = segments == s
                assert np.array_equal(b["positions"][row][at], np.arange(at.sum()))
                assert np.array_equal(b["tokens"][row][at][1:], b["targets"][row][at][:-1])
                piece = [*b["tokens"][row][at], b["targets"][row][at][-1]]
                if rebuilt and rebuilt[-1][-1] != tok.eos_id:  # a document continued from the last row
                    rebuilt[-1] += piece[1:]
                else:
                    rebuilt.append(piece)
    assert len(rebuilt) > 4
    for doc, ids in zip(DOCS, rebuilt[:-1], strict=False):
        assert ids == tok.encode(doc, bos=True, eos=True)


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_resumes_at_the_exact_next_batch(tokenizer, workers):
    docs = grain.MapDataset.source(DOCS)

    def fresh():
        return iter(data.train_batches(docs, tokenizer, 16, 2, seed=5, workers=workers, shuffle_window=8))

    it = fresh()
    first = [next(it) for _ in range(30)]  # more than one epoch
    it.close()
    it = fresh()
    for _ in range(10):
        next(it)
    state = it.get_state()
    it.close()
    resumed = fresh()
    resumed.set_state(json.loads(json.dumps(state)))
    for expected in first[10:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
    resumed.close()


def test_processes_read_disjoint_shares(tokenizer):
    tok = load_tokenizer(tokenizer)
    docs = grain.MapDataset.source(DOCS[:20])
    shares = []
    for index in range(2):
        ds = data.train_batches(docs, tokenizer, 2048, 1, seed=0, process_index=index, process_count=2)
        row = next(iter(ds))  # an epoch of a share (10 documents) fits in the first row
        tokens, segments = row["tokens"][0], row["segment_ids"][0]
        shares.append({tok.decode(tokens[segments == s][1:].tolist()) for s in range(1, 11)})
    assert shares[0] | shares[1] == set(DOCS[:20]) and not shares[0] & shares[1]


def test_unigram_entropy():
    targets = np.array([[0, 0, 1, 2, 9]])
    batch = {"targets": targets, "loss_mask": np.array([[1, 1, 1, 1, 0]])}
    p = np.array([0.5, 0.25, 0.25])
    assert data.unigram_entropy([batch], 10) == pytest.approx(-(p * np.log(p)).sum())


def test_document_lines_stop_at_the_limit():
    docs = grain.MapDataset.source(["a\n\nb\n", "c\nd"])
    assert list(data.document_lines(docs, 3)) == ["a", "b", "c"]
