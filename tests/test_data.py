import functools
import inspect
import itertools
import json
import re
import textwrap

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from llama_jax import batches as batches_lib
from llama_jax import documents
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

DOCS = [f"document {i}: " + "word " * (i * 7 % 40) + f"end {i}" for i in range(60)]


def train_batches(docs, tokenizer, seq_len, batch_size, seed, streams=1, workers=0, shuffle_window=1, **processes):
    pack = batches_lib.documents_packer(tokenizer, seq_len, workers, shuffle_window, seed)
    return batches_lib.train_batches(docs, pack, batch_size, seed, streams, **processes)


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
        docs = documents.open_documents(paths)
        assert [docs[i] for i in range(len(docs))] == DOCS, kind
        shuffled = docs.shuffle(3)
        assert sorted(shuffled[i] for i in range(len(docs))) == sorted(DOCS), kind


def test_expand_globs(tmp_path):
    write_formats(tmp_path)
    files = documents.expand(f"{tmp_path}/doc00*.txt, {tmp_path}/*.jsonl")
    assert [f.rsplit("/", 1)[1] for f in files] == [f"doc00{i}.txt" for i in range(10)] + ["part0.jsonl", "part1.jsonl"]
    with pytest.raises(documents.DataError, match="matches no file"):
        documents.expand(f"{tmp_path}/*.txt,{tmp_path}/nothing*")


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
    with pytest.raises(documents.DataError, match=message):
        documents.open_documents([str(tmp_path / name)], fmt)


def test_parquet_without_the_column(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(documents.DataError, match="no column 'text'"):
        documents.open_documents([str(tmp_path / "x.parquet")])


def test_default_corpus_is_the_standard_library_without_tests():
    files = documents.stdlib_files()
    assert len(files) > 300
    assert any(f.endswith("/json/decoder.py") for f in files)
    assert not any("/test/" in f or "/site-packages/" in f or f.rsplit("/", 1)[1].startswith("test_") for f in files)


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    paths = write_formats(tmp_path)["text"]
    corpus = documents.load_corpus(",".join(paths), "", 0.1, "auto", "text", seed=1)
    train, held = ({c[i] for i in range(len(c))} for c in (corpus.train, corpus.eval))
    assert len(held) == 6 and len(train) == 54 and not train & held
    again = documents.load_corpus(",".join(paths), "", 0.1, "auto", "text", seed=1)
    assert {again.eval[i] for i in range(6)} == held


def test_packed_rows(tokenizer):
    tok = load_tokenizer(tokenizer)
    docs = grain.MapDataset.source(DOCS[:12])
    batches = list(itertools.islice(batches_lib.documents_packer(tokenizer, 32)(docs, 2, True), 3))
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


@pytest.mark.parametrize(("workers", "streams"), [(0, 1), (1, 1), (0, 2), (1, 2)])
def test_iterator_state_resumes_at_the_exact_next_batch(tokenizer, workers, streams):
    docs = grain.MapDataset.source(DOCS)

    def fresh():
        return train_batches(docs, tokenizer, 16, 2, seed=5, streams=streams, workers=workers, shuffle_window=8)

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


def test_a_state_at_a_document_boundary_resumes_exactly(tokenizer):
    """Before the first row no document is half consumed: grain's packer marks that with a tuple
    that JSON turns into a list (see batches._slices_as_tuples)."""
    docs = grain.MapDataset.source(DOCS)
    make = functools.partial(train_batches, docs, tokenizer, 16, 2, seed=2, shuffle_window=4)
    expected = make()
    resumed = make()
    resumed.set_state(json.loads(json.dumps(make().get_state())))
    for _ in range(3):
        got, want = next(resumed), next(expected)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_batches_do_not_depend_on_the_process_count(tokenizer):
    """4 streams, batch 8: one process, 2 processes and 4 processes see the same global batches (each
    process holds a contiguous block of rows), and each stream reads its own documents."""
    docs = grain.MapDataset.source(DOCS)

    def batches(index: int, count: int) -> list[dict]:
        it = train_batches(docs, tokenizer, 32, 8, seed=3, streams=4, shuffle_window=4,
                                process_index=index, process_count=count)  # fmt: skip
        out = [next(it) for _ in range(6)]
        it.close()
        return out

    one = batches(0, 1)
    for count in (2, 4):
        per_process = [batches(i, count) for i in range(count)]
        for step, expected in enumerate(one):
            for k in expected:
                np.testing.assert_array_equal(np.concatenate([p[step][k] for p in per_process]), expected[k])
    tok = load_tokenizer(tokenizer)
    rows = np.concatenate([b["tokens"] for b in one])  # rows 2s, 2s+1 of every batch come from stream s
    for stream in range(4):
        text = tok.decode(rows[[r for r in range(len(rows)) if r % 8 // 2 == stream]].ravel().tolist())
        seen = {int(n) for n in re.findall(r"document (\d+):", text)}
        assert seen and all(n % 4 == stream for n in seen), (stream, seen)


def test_a_state_saved_by_two_processes_resumes_in_one(tokenizer):
    docs = grain.MapDataset.source(DOCS)
    make = functools.partial(train_batches, docs, tokenizer, 16, 4, seed=1, streams=2, shuffle_window=4)
    one = make()
    expected = [next(one) for _ in range(12)][5:]
    halves = [make(process_index=i, process_count=2) for i in range(2)]
    for _ in range(5):
        for it in halves:
            next(it)
    state = {k: v for it in halves for k, v in json.loads(json.dumps(it.get_state())).items()}
    resumed = make()
    resumed.set_state(state)
    for batch in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], batch[k]) for k in batch)
    with pytest.raises(documents.DataError, match="cannot be shared by 3 processes"):
        make(process_index=0, process_count=3)
    with pytest.raises(documents.DataError, match="no state for data stream 1"):
        make().set_state(halves[0].get_state())
    for it in (one, resumed, *halves):
        it.close()


def test_unigram_entropy():
    targets = np.array([[0, 0, 1, 2, 9]])
    batch = {"targets": targets, "loss_mask": np.array([[1, 1, 1, 1, 0]])}
    p = np.array([0.5, 0.25, 0.25])
    assert batches_lib.unigram_entropy([batch], 10) == pytest.approx(-(p * np.log(p)).sum())


def test_document_lines_stop_at_the_limit():
    docs = grain.MapDataset.source(["a\n\nb\n", "c\nd"])
    assert list(documents.document_lines(docs, 3)) == ["a", "b", "c"]
