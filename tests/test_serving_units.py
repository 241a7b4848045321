"""Serving parts without a model: page accounting and the prefix cache, the scheduler's
admission and chunking, and incremental detokenization with stop strings."""

import random
import threading
import time

import pytest

from llama_jax.serving.detokenizer import Detokenizer
from llama_jax.serving.pages import PagePool, page_hashes
from llama_jax.serving.programs import COMPILE_AFTER, Programs
from llama_jax.serving.scheduler import QueueFull, Scheduler, Sequence
from llama_jax.serving.step import StepShape
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

TEXT = "The quick brown fox jumps over the lazy dog 12345.\nPack my box with five dozen jugs! é ü ß 日本語 😀\n" * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text(TEXT)
    return load_tokenizer(str(train_sentencepiece([root / "corpus.txt"], str(root / "sp"), vocab_size=400)))


def test_pool_shares_named_pages_and_evicts_least_recent():
    pool = PagePool(6, 4)  # pages 1..5
    a, b = page_hashes(list(range(8)), 4), page_hashes([9] * 4, 4)
    pages = pool.allocate(2)
    for p, h in zip(pages, a, strict=True):
        pool.register(p, h, pending=True)
    assert pool.match(a) == ([], True)  # still being computed: wait for it
    pool.computed(pages[0])
    assert pool.match(a) == ([pages[0]], True)
    pool.computed(pages[1])
    assert pool.match(a) == (pages, False)
    pool.acquire(pages)  # a second sequence shares them
    pool.release(pages)
    pool.release(pages)  # both done: cached, not free
    assert pool.stats()["pages_cached"] == 2 and pool.available == 5 and pool.in_use == 0
    other = pool.allocate(3)  # the free pages go first
    assert set(other).isdisjoint(pages) and pool.match(a) == (pages, False)
    pool.register(other[0], b[0], pending=False)
    pool.acquire([pages[1]])  # pages[0] becomes the least recently used
    evicted = pool.allocate(1)
    assert evicted == [pages[0]] and pool.match(a) == ([], False)
    pool.release([pages[1], *evicted, *other])
    pool.check()
    assert pool.in_use == 0 and pool.stats()["references"] == 0


def test_pending_pages_released_by_their_writer_are_forgotten():
    pool = PagePool(4, 2)
    h = page_hashes([1, 2], 2)
    page = pool.allocate(1)
    pool.register(page[0], h[0], pending=True)
    pool.release(page)  # cancelled before computing it
    assert pool.match(h) == ([], False) and pool.stats()["pages_free"] == 3
    pool.check()


def test_page_hashes_chain_prefixes():
    x, y = page_hashes([1, 2, 3, 4, 5, 6], 2), page_hashes([1, 2, 9, 4, 5, 6], 2)
    assert len(x) == 3 and x[0] == y[0] and x[1] != y[1] and x[2] != y[2]  # equal pages, different prefixes
    assert page_hashes([1, 2, 3], 2) == x[:1]  # only full pages


def make_scheduler(num_pages=33, page=4, seqs=4, queue=8, chunk=16, prefill_seqs=2) -> Scheduler:
    return Scheduler(PagePool(num_pages, page), seqs, queue, chunk, prefill_seqs)


def test_admission_needs_slots_and_pages_and_the_queue_is_bounded():
    s = make_scheduler(num_pages=12, seqs=2, queue=3)  # 11 pages of 4 tokens, 2 slots
    big, small, tiny = Sequence([1] * 10, 20), Sequence([2] * 3, 4), Sequence([3] * 3, 2)
    s.add([big, small])
    with pytest.raises(QueueFull):
        s.add([tiny, Sequence([4], 1)])  # 4 > 3 waiting
    s.add([tiny])
    plan = s.schedule()
    assert (len(big.pages), len(small.pages)) == (8, 2)  # ceil((10 + 20 - 1) / 4), ceil((3 + 4 - 1) / 4)
    assert s.running == [big, small] and list(s.waiting) == [tiny]  # no slot for the third
    assert [seq for seq, _ in plan.prefill] == [big, small] and plan.decode == []
    s.finish(small)
    s.schedule()
    assert s.running == [big, tiny] and small.pages == [] and s.pool.in_use == 9
    huge = Sequence([5] * 3, 10)  # 3 pages: only 2 left, so it waits (and so does what follows it)
    s.add([huge, Sequence([6], 2)])
    s.schedule()
    assert list(s.waiting)[0] is huge and len(s.waiting) == 2
    for seq in [*s.running, *s.waiting]:
        s.finish(seq)
    assert s.pool.in_use == 0 and not s.waiting and not s.running
    s.pool.check()


def test_pages_reserved_for_the_whole_length():
    s = make_scheduler(num_pages=9)
    seq = Sequence([1] * 10, 7)  # positions 0..15 are fed at most: 4 pages of 4
    s.add([seq])
    s.schedule()
    assert len(seq.pages) == 4 == s.pages_needed(10, 7)


def test_chunked_prefill_starts_on_page_boundaries_then_decodes():
    s = make_scheduler(chunk=8, prefill_seqs=2)
    a, b = Sequence(list(range(1, 20)), 3), Sequence(list(range(50, 55)), 3)  # no common prefix
    s.add([a, b])
    plan = s.schedule()  # a alone fills the chunk (8 tokens); a split would prefill 4 + 4
    assert plan.prefill_width == 8 and [(x, n) for x, n in plan.prefill] == [(a, 8)]
    s.advance(a, 8, None)
    plan = s.schedule()
    assert [(x, n) for x, n in plan.prefill] == [(a, 8)]
    s.advance(a, 8, None)
    plan = s.schedule()  # a has 3 tokens left: a split prefills 3 + 4 rather than 3
    assert plan.prefill_width == 4 and [(x, n) for x, n in plan.prefill] == [(a, 3), (b, 4)]
    s.advance(a, 3, 7)  # a's prompt done: its first token
    s.advance(b, 4, None)
    plan = s.schedule()
    assert plan.decode == [a] and plan.prefill == [(b, 1)] and plan.prefill_width == 4  # one page, not the chunk
    assert all(x.computed % 4 == 0 for x, _ in plan.prefill)


def test_many_short_prompts_share_the_chunk():
    s = make_scheduler(seqs=8, chunk=32, prefill_seqs=8)
    short = [Sequence([i, i + 1, i + 2], 2) for i in range(10, 70, 10)]  # six prompts of 3 tokens
    s.add(short)
    plan = s.schedule()  # 8 rows of 4: all six prompts at once (18 tokens; 4 rows of 8 would take 12)
    assert plan.prefill_width == 4 and [(x, n) for x, n in plan.prefill] == [(x, 3) for x in short]
    alone = make_scheduler(chunk=32, prefill_seqs=8)
    alone.add([Sequence(list(range(1, 7)), 2)])  # 6 tokens: 1 row of 2 pages, not of the 32-token chunk
    assert alone.schedule().prefill_width == 8


def test_shared_prefix_is_computed_once():
    s = make_scheduler(seqs=4, chunk=8, prefill_seqs=4)
    system = list(range(100, 112))  # three full pages
    first, second = Sequence(system + [1, 2], 2), Sequence(system + [3], 2)
    s.add([first, second])
    s.schedule()
    assert s.running == [first] and second in s.waiting  # waits for first's pending pages
    for _ in range(2):
        plan = s.schedule()
        for seq, n in plan.prefill:
            s.advance(seq, n, 5 if seq.computed + n >= len(seq.prompt) else None)
    plan = s.schedule()
    assert second in s.running and second.cached == 12 and second.pages[:3] == first.pages[:3]
    assert s.pool.queried_tokens == 14 + 13 and s.pool.hit_tokens == 12
    for seq in (first, second):
        s.finish(seq)
    s.pool.check()
    assert s.pool.stats()["pages_cached"] >= 3 and s.pool.in_use == 0


def test_detokenizer_releases_whole_characters_and_equals_decode(tokenizer):
    rng = random.Random(0)
    texts = TEXT.splitlines()
    byte_tokens = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd"]
    assert byte_tokens  # byte fallback pieces exist (multi-byte characters split into bytes)
    for trial in range(60):
        if trial % 2:
            ids = tokenizer.encode(rng.choice(texts) + rng.choice(texts))
        else:  # random ids, byte pieces included
            ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        d = Detokenizer(tokenizer)
        pieces = [d.add(t) for t in ids] + [d.flush()]
        assert "".join(pieces) == tokenizer.decode(ids), (ids, pieces)
        if trial % 2:  # valid text: no piece ends inside a character
            assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_cut_across_tokens(tokenizer):
    text = "Pack my box with five dozen jugs!"
    ids = tokenizer.encode(text)
    for stop in ["five doz", "x w", "jugs!", "q"]:
        d = Detokenizer(tokenizer, [stop, "never there"])
        out = "".join(d.add(t) for t in ids) + d.flush()
        expected = text[: text.find(stop)] if stop in text else text
        assert out == expected and d.stopped == (stop in text), (stop, out)


def test_held_back_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    d = Detokenizer(tokenizer, ["box with six"])
    out = [d.add(t) for t in tokenizer.encode("Pack my box with five")]
    assert "".join(out) + d.flush() == "Pack my box with five" and not d.stopped


def test_sequence_token_at():
    seq = Sequence([1, 2, 3], 5, tokens=[7, 8])
    assert [seq.token_at(i) for i in range(5)] == [1, 2, 3, 7, 8]


def test_scheduler_rejects_chunks_that_are_not_whole_pages():
    with pytest.raises(ValueError, match="multiple of --page-size"):
        Scheduler(PagePool(8, 16), 4, 4, 24, 2)


def test_a_new_step_shape_runs_padded_until_its_program_compiles():
    compiled, done = [], threading.Event()

    def compile_shape(shape):
        compiled.append(shape)
        done.set()

    programs = Programs(compile_shape)
    big = StepShape(rows=16, live=64, pages=8, prefill=(4, 64))
    assert programs.choose(big) == big  # nothing holds it: the step compiles it itself
    small = StepShape(rows=8, live=16, pages=8, prefill=(2, 32))
    decode_only = StepShape(rows=8, live=16, pages=8)
    assert big.holds(small) and big.holds(decode_only) and not small.holds(big)
    assert not StepShape(16, 64, 8, (4, 16)).holds(small)  # a prefill group too narrow
    for _ in range(COMPILE_AFTER):
        assert programs.choose(small) == big  # padded meanwhile
    assert done.wait(30) and compiled == [small]
    deadline = time.monotonic() + 30
    while programs.choose(small) != small:  # ready once the background compile has finished
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert programs.padded_steps >= COMPILE_AFTER and programs.background_compiles == 1
    programs.stop()
