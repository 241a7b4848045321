"""The `llama-jax` lm-eval backend gives the numbers of lm-eval's own `hf` backend on the same model
(a tiny random HF Llama, converted to Orbax), on local tasks: multiple choice (few-shot contexts
longer than the model's context, cut on the left), generation with stop strings, rolling perplexity."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from llama_jax import infer  # noqa: E402
from llama_jax.chat import encode_dialog  # noqa: E402
from llama_jax.convert import Checkpoint, load_checkpoint, open_checkpoint, save_checkpoint  # noqa: E402
from llama_jax.generate import Sampling, generate  # noqa: E402
from llama_jax.harness import HFTextCodec, LlamaJaxLM, lm_eval_main  # noqa: E402
from llama_jax.tokenizer import TiktokenTokenizer, load_tokenizer  # noqa: E402

WORDS = (
    "red green blue stone river fox dog cat tree house moon sun rain snow bird fish road hill lake boat "
    "apple bread milk salt iron gold wood glass paper sand"
).split()
CONTEXT = 64  # the model's max_position_embeddings: some few-shot contexts and all documents exceed it
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "red fox?"},
          {"role": "assistant", "content": "blue dog"}, {"role": "user", "content": "moon and sun"}]  # fmt: skip


def sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".,!?\n") for _ in range(n)]


def write_tokenizer(directory: Path, texts: list[str], vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json, BOS added by its post-processor, that transformers'
    AutoTokenizer and llama_jax.tokenizer.load_tokenizer both read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def metrics(higher: bool, **aggregation: str) -> str:
    rows = (
        f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: {str(higher).lower()}\n"
        for m, a in aggregation.items()
    )
    return "metric_list:\n" + "".join(rows)


def write_tasks(directory: Path, rng: random.Random) -> None:
    """Three lm-eval tasks over local JSON lines (`dataset_path: json`): nothing is downloaded."""
    mc = []
    for _ in range(16):
        question = " ".join(rng.sample(WORDS, rng.randint(1, 12)))
        mc.append({"question": question, "choices": rng.sample(WORDS, 4), "label": rng.randrange(4)})
    gen = [{"prompt": " ".join(rng.sample(WORDS, rng.randint(2, 9))), "answer": rng.choice(WORDS)} for _ in range(9)]
    gen.append({"prompt": " ".join(WORDS * 2), "answer": "fox"})  # longer than the context left to it
    ppl = [{"text": " ".join(sentences(rng, rng.randint(4, 25)))} for _ in range(6)]
    for name, rows in [("mc", mc), ("gen", gen), ("ppl", ppl)]:
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + head.format(path=directory / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "num_fewshot: 1\nfewshot_split: test\n" + metrics(True, acc="mean", acc_norm="mean")
    )
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + head.format(path=directory / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "e"]\n  max_gen_toks: 16\n  do_sample: false\n'
        + metrics(True, exact_match="mean")
    )
    (directory / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + head.format(path=directory / "ppl.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + metrics(
            False,
            word_perplexity="weighted_perplexity",
            byte_perplexity="weighted_perplexity",
            bits_per_byte="bits_per_byte",
        )
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_hf_llama) -> dict:
    root = tmp_path_factory.mktemp("harness")
    rng = random.Random(0)
    (root / "hf").mkdir()
    (root / "tasks").mkdir()
    write_tokenizer(root / "hf", sentences(rng, 300), vocab_size=300)
    vocab = json.loads((root / "hf" / "tokenizer.json").read_text())["model"]["vocab"]
    hf = make_hf_llama(vocab_size=len(vocab), max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=2)
    hf.save_pretrained(root / "hf")
    save_checkpoint(open_checkpoint(root / "hf"), root / "orbax", "orbax")  # the tokenizer files come along
    write_tasks(root / "tasks", rng)
    return {"hf": str(root / "hf"), "orbax": str(root / "orbax"), "tasks": str(root / "tasks")}


def evaluate(env, lm, tasks=("tiny_mc", "tiny_gen", "tiny_ppl"), **kw):
    manager = TaskManager(include_path=env["tasks"], include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True, **kw)


@pytest.fixture(scope="module")
def ours(env):
    lm = LlamaJaxLM(checkpoint=env["orbax"], dtype="float32", batch_size=4)
    return lm, evaluate(env, lm)


@pytest.fixture(scope="module")
def hf_lm(env):
    pytest.importorskip("accelerate")  # lm-eval's hf backend needs it
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=env["hf"], dtype="float32", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def theirs(env, hf_lm):
    return evaluate(env, hf_lm)


def responses(results, task):
    """Per document, the model's answer to each of its requests."""
    return [[r[0] for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_and_accuracy_match_hf(ours, theirs):
    lm, mine = ours
    a, b = responses(mine, "tiny_mc"), responses(theirs, "tiny_mc")
    assert [len(doc) for doc in a] == [4] * 16
    ll_a, ll_b = (np.array([[c[0] for c in doc] for doc in x]) for x in (a, b))
    assert np.abs(ll_a - ll_b).max() < 1e-4  # float32 logits of a 2-layer model: ~1e-5 apart
    assert [[c[1] for c in doc] for doc in a] == [[c[1] for c in doc] for doc in b]
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]
    assert 0 < mine["config"]["truncated_requests"]["loglikelihood"] < 64  # some 1-shot contexts exceed 64 tokens


def test_is_greedy_matches_hf(env, ours, hf_lm):
    """Token-level requests whose continuations are the model's greedy tokens (is_greedy True), and
    the same with the last token changed (False), scored by both backends."""
    lm, _ = ours
    contexts = [lm.tok_encode(" ".join(WORDS[i : i + n])) for i, n in [(0, 3), (5, 12), (9, 1), (2, 16)]]
    greedy = generate(lm.lm.model, lm.lm.params, contexts, 5, Sampling(0.0), stop_ids=())
    requests = [(None, c, g.tokens) for c, g in zip(contexts, greedy, strict=True)]
    requests += [(None, c, [*g[:-1], (g[-1] + 1) % 300]) for _, c, g in requests]
    a, b = lm._loglikelihood_tokens(requests), hf_lm._loglikelihood_tokens(requests)
    assert [x[1] for x in a] == [x[1] for x in b] == [True] * 4 + [False] * 4
    assert np.abs(np.array([x[0] for x in a]) - [x[0] for x in b]).max() < 1e-4


def test_greedy_generations_match_hf(ours, theirs):
    lm, mine = ours
    a, b = responses(mine, "tiny_gen"), responses(theirs, "tiny_gen")
    assert a == b
    texts = [doc[0] for doc in a]
    assert len(set(texts)) == len(texts)
    # The stop strings cut some completions short: the same prompts generated without them.
    prompts = [lm.tok_encode(s["arguments"][0][0])[-(CONTEXT - 16) :] for s in mine["samples"]["tiny_gen"]]
    free = lm.generate_batch(prompts, 16, lm.sampling({"do_sample": False}), [])
    cut = [f.split("\n")[0].split("e")[0] for f in free]
    assert sorted(cut) == sorted(texts) and cut != free
    assert mine["config"]["truncated_requests"]["generate_until"] == 1


def test_rolling_perplexity_matches_hf(ours, theirs):
    lm, mine = ours
    a, b = (np.array(responses(x, "tiny_ppl"))[:, 0] for x in (mine, theirs))
    assert np.abs(a / b - 1).max() < 1e-4
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert abs(mine["results"]["tiny_ppl"][metric] / theirs["results"]["tiny_ppl"][metric] - 1) < 1e-4, metric
    lengths = [len(lm.tok_encode(s["arguments"][0][0])) for s in mine["samples"]["tiny_ppl"]]
    assert max(lengths) > 3 * CONTEXT  # several windows per document


def test_tokenization_matches_the_hf_tokenizer(env):
    """BOS, special-token texts and decoding as transformers' tokenizer does them (HFLM's calls)."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(env["hf"])
    codec = HFTextCodec(load_tokenizer(env["orbax"]))
    assert codec.tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in ["red fox", " red</s>fox", "<s>moon <unk> sun", "", "\n\n"]:
        assert codec.encode(text) == (
            hf.encode(text, add_special_tokens=False) if text.startswith("<s>") else hf.encode(text)
        )
        assert codec.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    ids = [1, *hf.encode("blue river", add_special_tokens=False), 2, 0, *hf.encode(" tree", add_special_tokens=False)]
    assert codec.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "blue river tree"
    assert HFTextCodec(load_tokenizer(env["orbax"]), add_bos_token=False).encode("red") == hf.encode("red")[1:]


@pytest.mark.parametrize("fmt", ["llama2", "llama3"])
def test_chat_text_reads_back_as_the_dialog_tokens(env, fmt):
    tok = load_tokenizer(env["orbax"]) if fmt == "llama2" else TiktokenTokenizer({bytes([b]): b for b in range(256)})
    assert tok.chat_format == fmt
    codec = HFTextCodec(tok)
    ids = encode_dialog(tok, DIALOG)
    assert codec.encode(codec.chat(DIALOG)) == ids
    continued = codec.encode(codec.chat([*DIALOG, {"role": "assistant", "content": "Answer:"}], False))
    assert continued[: len(ids)] == ids and tok.decode(continued[len(ids) :]).strip() == "Answer:"


def test_chat_template_and_multiturn_fewshot_through_lm_eval(env, ours):
    lm, _ = ours
    results = evaluate(env, lm, ("tiny_mc", "tiny_gen"), limit=3, apply_chat_template=True, fewshot_as_multiturn=True)
    for task in ("tiny_mc", "tiny_gen"):
        for sample in results["samples"][task]:
            context = sample["arguments"][0][0]
            assert context.startswith("<s>[INST]") and context.count("[/INST]") == (2 if task == "tiny_mc" else 1)
    assert 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1


# -- infer.py eval and lm-eval's own command line ---------------------------------------------
def test_eval_prints_the_table_and_writes_json(env, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["eval", "--checkpoint", env["orbax"], "--tasks", "tiny_mc,tiny_ppl", "--include-path", env["tasks"],
            "--limit", "4", "--batch-size", "4", "--output", str(out)]  # fmt: skip
    assert infer.main(argv) == 0
    captured = capsys.readouterr()
    assert "|tiny_mc |" in captured.out and "|acc" in captured.out and "|bits_per_byte" in captured.out
    results = json.loads(out.read_text())
    assert (
        0 <= results["results"]["tiny_mc"]["acc,none"] <= 1 and results["results"]["tiny_ppl"]["bits_per_byte,none"] > 0
    )
    assert results["config"]["checkpoint"] == env["orbax"] and results["n-samples"]["tiny_mc"]["effective"] == 4
    truncated = results["config"]["truncated_requests"]["loglikelihood"]
    assert f"note: {truncated} loglikelihood requests were cut on the left" in captured.err and truncated > 0
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.fixture(scope="module")
def no_tokenizer(env, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("notok") / "model"
    save_checkpoint(Checkpoint(**{**vars(load_checkpoint(env["orbax"])), "tokenizer_files": []}), path, "orbax")
    return str(path)


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("unknown task", "unknown lm-eval task(s): no_such_task"),
        ("no tokenizer", "no tokenizer found"),
        ("limit 0", "--limit must be positive"),
        ("multiturn without chat", "--fewshot-as-multiturn needs --apply-chat-template"),
    ],
)
def test_eval_bad_input_is_one_error_line(env, no_tokenizer, tmp_path, capsys, case, fragment):
    tasks, checkpoint, extra = "tiny_mc", env["orbax"], []
    if case == "unknown task":
        tasks = "tiny_mc,no_such_task"
    elif case == "no tokenizer":
        checkpoint = no_tokenizer
    elif case == "limit 0":
        extra = ["--limit", "0"]
    else:
        extra = ["--fewshot-as-multiturn"]
    out = tmp_path / "results.json"
    argv = ["eval", "--checkpoint", checkpoint, "--tasks", tasks, "--include-path", env["tasks"], "--output", str(out)]
    assert infer.main([*argv, *extra]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not out.exists()


def test_lm_eval_command_line_runs_the_backend(env, tmp_path, capsys, monkeypatch):
    """`llama-jax-lm-eval --model llama-jax ...`: lm-eval's own CLI, the backend registered."""
    argv = ["llama-jax-lm-eval", "--model", "llama-jax", "--model_args", f"checkpoint={env['orbax']},dtype=float32",
            "--tasks", "tiny_ppl", "--include_path", env["tasks"], "--limit", "2",
            "--output_path", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    lm_eval_main()
    assert "|tiny_ppl|" in capsys.readouterr().out
    (saved,) = tmp_path.rglob("results_*.json")
    assert json.loads(saved.read_text())["results"]["tiny_ppl"]["word_perplexity,none"] > 1
