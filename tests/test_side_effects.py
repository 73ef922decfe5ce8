"""Side-effect and fluency evaluators: PIQA, WikiText-2 perplexity, n-gram entropy, TF-IDF consistency.

Text metrics are checked against values worked out by hand; model metrics are checked on a
tiny random Llama (wiring, exactness against a naive forward pass, batch-size invariance)
and, marked ``model``, on the real SmolLM2.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import re

import pytest
import torch

from lmpatch.data.paths import FILES_DIR
from lmpatch.errors import InvalidRequestError
from lmpatch.eval.fluency import (
    consistency,
    fit_idf,
    fluency,
    generation_texts,
    ngram_entropy,
    split_sentences,
    text_ngram_entropy,
    word_tokenize,
)
from lmpatch.eval.perplexity import perplexity, token_windows, wikitext2_test_text
from lmpatch.eval.piqa import (
    PIQA_SIZE,
    PiqaPrediction,
    TaskScore,
    load_piqa,
    piqa_accuracy,
    piqa_predictions,
    piqa_prompt,
)
from lmpatch.eval.scoring import score_targets
from tiny import tiny_model


def h(*probs: float) -> float:
    """Shannon entropy in bits of a distribution given by its probabilities."""
    return -sum(p * math.log2(p) for p in probs)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=3)


# --------------------------------------------------------------------------- word tokenizer


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("Hello, world.", ["Hello", ",", "world", "."]),
        ("I can't go. Mr. Smith isn't here!", ["I", "ca", "n't", "go", ".", "Mr.", "Smith", "is", "n't", "here", "!"]),
        ('He said "yes" (twice) -- then left...', ["He", "said", "``", "yes", "''", "(", "twice", ")", "--", "then",
                                                  "left", "..."]),
        ("It costs $5, or 1,000 yen; we're gonna pay.", ["It", "costs", "$", "5", ",", "or", "1,000", "yen", ";", "we",
                                                         "'re", "gon", "na", "pay", "."]),
        ("The U.S. team won. J. Doe scored at 3:30 p.m. today.", ["The", "U.S.", "team", "won", ".", "J.", "Doe",
                                                                   "scored", "at", "3:30", "p.m.", "today", "."]),
        ("Is it 'great'? The dogs' bowls cannot wait.", ["Is", "it", "'", "great", "'", "?", "The", "dogs", "'",
                                                         "bowls", "can", "not", "wait", "."]),
    ],
)
def test_word_tokenize_follows_treebank_rules(text, tokens):
    assert word_tokenize(text) == tokens


def test_sentences_split_after_end_punctuation_but_not_abbreviations():
    text = 'Dr. Who arrived. "Why?" she asked! Then e.g. this... Ok'
    assert split_sentences(text) == ["Dr. Who arrived.", '"Why?"', "she asked!", "Then e.g. this...", "Ok"]


# --------------------------------------------------------------------------- n-gram entropy


def test_ngram_entropy_hand_computed():
    # Tokens a b a b: bigrams (a,b) x2, (b,a) x1; trigrams (a,b,a), (b,a,b) once each.
    h2, h3 = h(2 / 3, 1 / 3), h(1 / 2, 1 / 2)
    expected = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert h2 == pytest.approx(0.9182958, abs=1e-7)
    assert text_ngram_entropy("a b a b") == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.9727653, abs=1e-7)
    # Punctuation is a token: "x, x, x." -> x , x , x . : bigrams (x,,) x2, (,,x) x2, (x,.) x1.
    assert text_ngram_entropy("x, x, x.", ns=(2,), weights=(1.0,)) == pytest.approx(h(0.4, 0.4, 0.2), abs=1e-12)


def test_ngram_entropy_is_mean_over_texts_and_zero_for_short_or_repetitive_text():
    one, two = "a b a b", "the cat sat on the mat"
    # 6 tokens, 5 distinct bigrams and 4 distinct trigrams: H2 = log2 5, H3 = log2 4.
    assert text_ngram_entropy(two) == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * 2) / 2, abs=1e-12)
    assert ngram_entropy([one, two]) == pytest.approx((text_ngram_entropy(one) + text_ngram_entropy(two)) / 2)
    assert text_ngram_entropy("word") == 0.0  # no bigram at all
    assert text_ngram_entropy("go go go go go go") == 0.0  # one bigram and one trigram type
    assert text_ngram_entropy("a b c d e f g h") > text_ngram_entropy("a b a b a b a b")
    with pytest.raises(InvalidRequestError):
        ngram_entropy([])
    with pytest.raises(InvalidRequestError):
        ngram_entropy("a single string")
    with pytest.raises(InvalidRequestError):
        text_ngram_entropy("a b", ns=(2, 3), weights=(1.0,))


# --------------------------------------------------------------------------- TF-IDF consistency


def test_tfidf_consistency_hand_computed():
    refs = ["The cat sat.", "the dog ran"]
    # Fitted on refs (N = 2): df(the) = 2 -> idf 1; cat, sat, dog, ran: df 1 -> idf = ln(3/2) + 1.
    vocab, idf = fit_idf(refs)
    w = math.log(1.5) + 1
    assert sorted(vocab) == ["cat", "dog", "ran", "sat", "the"]
    assert idf[vocab["the"]] == pytest.approx(1.0) and idf[vocab["cat"]] == pytest.approx(w)
    # Joined refs: the x2, cat, sat, dog, ran x1 -> (2, w, w, w, w). Text "A cat sat!": "a" is one
    # character (not a term) -> (0, w, w, 0, 0). Cosine = 2w^2 / (sqrt(2) w * sqrt(4 + 4 w^2)).
    expected = 2 * w * w / (math.sqrt(2) * w * math.sqrt(4 + 4 * w * w))
    assert consistency(["A cat sat!"], refs) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.5761524, abs=1e-7)


def test_tfidf_consistency_edge_cases_and_idf_corpus():
    refs = ["paris is the capital of france", "the louvre is in paris"]
    assert consistency(refs, refs) == pytest.approx(1.0)
    assert consistency(["tokyo osaka kyoto"], refs) == 0.0  # nothing in the vocabulary
    assert consistency(["Paris PARIS paris"], refs) > 0  # lower-cased
    # The IDF corpus fixes vocabulary and weights: by default it is the references themselves,
    # and words outside it are ignored even when text and references share them.
    text = ["the louvre in paris"]
    assert consistency(text, refs, idf_corpus=refs) == consistency(text, refs)
    assert consistency(text, refs, idf_corpus=["the sky"]) == pytest.approx(1.0)  # only "the" counts
    # Only "the" and "is" (equal IDF) count: text (1, 0), references (2, 2) -> cosine 1/sqrt(2).
    assert consistency(text, refs, idf_corpus=["the sky is blue"]) == pytest.approx(1 / math.sqrt(2))
    assert consistency(text, refs, idf_corpus=["sky blue"]) == 0.0
    # A word frequent in the IDF corpus counts less: with "paris" in every document, sharing
    # it is worth less than sharing the rarer "louvre".
    corpus = refs + ["paris at night", "paris in spring", "paris is big"]
    assert consistency(["louvre"], refs, idf_corpus=corpus) > consistency(["paris"], refs, idf_corpus=corpus)
    with pytest.raises(InvalidRequestError):
        consistency([], refs)
    with pytest.raises(InvalidRequestError):
        consistency("one string", refs)


# --------------------------------------------------------------------------- PIQA data and rules


def test_piqa_loader():
    items = load_piqa()
    assert len(items) == PIQA_SIZE == 1838
    assert {it.label for it in items} == {0, 1}
    assert sum(it.label for it in items) == 928
    assert all(it.goal and it.sol1 and it.sol2 for it in items)
    assert items[0].goal == "How do I ready a guinea pig cage for it's new occupants?"
    assert items[0].label == 0
    assert load_piqa(5) == items[:5]
    assert piqa_prompt("Open a jar.") == "Question: Open a jar.\nAnswer:"
    for bad in (0, 1839):
        with pytest.raises(InvalidRequestError):
            load_piqa(bad)


def test_piqa_shipped_files_are_the_upstream_bytes_with_license():
    folder = FILES_DIR / "piqa"
    attribution = (folder / "ATTRIBUTION.md").read_text()
    hashes = dict(re.findall(r"^\| (\S+\.gz) \| ([0-9a-f]{64}) \|$", attribution, flags=re.MULTILINE))
    assert sorted(hashes) == ["valid-labels.lst.gz", "valid.jsonl.gz"]
    for name, digest in hashes.items():
        assert hashlib.sha256(gzip.decompress((folder / name).read_bytes())).hexdigest() == digest
    assert "21edab439af693b961be2f069e8690a88d3b4e37" in attribution
    license_text = (folder / "LICENSE").read_text()
    assert "Licensed under the Academic Free License version 3.0" in license_text


def test_piqa_decision_rules():
    # Solution 0: 2 tokens, 10 chars, sum -4 (mean -2, -0.4/char); solution 1: 5 tokens, 40 chars,
    # sum -7.5 (mean -1.5, -0.1875/char). Sum prefers 0; per token and per char prefer 1.
    p = PiqaPrediction(label=1, logprob_sums=(-4.0, -7.5), n_tokens=(2, 5), n_chars=(10, 40))
    assert (p.choice, p.choice_sum, p.choice_char_norm) == (1, 0, 1)
    tie = PiqaPrediction(label=1, logprob_sums=(-3.0, -3.0), n_tokens=(3, 3), n_chars=(5, 5))
    assert (tie.choice, tie.choice_sum, tie.choice_char_norm) == (0, 0, 0)  # ties go to sol1


# --------------------------------------------------------------------------- PIQA on models


def test_piqa_wiring_and_scores_match_the_scorer_tiny(tiny):
    items = load_piqa(6)
    preds = piqa_predictions(tiny, items, batch_size=4)
    for it, p in zip(items, preds):
        direct = score_targets(tiny, [(piqa_prompt(it.goal), it.sol1), (piqa_prompt(it.goal), it.sol2)], batch_size=1)
        assert p.logprob_sums == pytest.approx(tuple(sum(s.logprobs) for s in direct), abs=1e-4)
        assert p.n_tokens == tuple(s.n_tokens for s in direct)
        assert p.n_chars == (len(it.sol1), len(it.sol2)) and p.label == it.label
    score = piqa_accuracy(tiny, n=6, batch_size=4, progress=False)
    assert isinstance(score, TaskScore) and score.name == "piqa_accuracy" and score.n == 6
    assert score.value == sum(p.choice == p.label for p in preds) / 6
    assert score.details["acc"] == sum(p.choice_sum == p.label for p in preds) / 6
    assert score.details["acc_norm"] == sum(p.choice_char_norm == p.label for p in preds) / 6
    assert "first 6 of 1838" in score.protocol and "Question: {goal}" in score.protocol
    assert score.to_dict()["value"] == score.value


def test_piqa_batch_size_invariance_tiny(tiny):
    items = load_piqa(12)
    one = piqa_predictions(tiny, items, batch_size=1)
    eight = piqa_predictions(tiny, items, batch_size=8)
    for a, b in zip(one, eight):
        assert a.logprob_sums == pytest.approx(b.logprob_sums, abs=1e-4)
        assert (a.choice, a.choice_sum, a.choice_char_norm) == (b.choice, b.choice_sum, b.choice_char_norm)


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("n_ids, window, stride", [(2, 2, 1), (10, 4, 3), (10, 4, 1), (100, 16, 8), (17, 16, 15)])
def test_token_windows_predict_every_token_once_with_bounded_context(n_ids, window, stride):
    spans = token_windows(n_ids, window, stride)
    predicted = [t for _, first, end in spans for t in range(first, end)]
    assert predicted == list(range(1, n_ids))
    for start, first, end in spans:
        assert end - start <= window and first - start >= 1
        assert first - start >= min(window - stride, first)  # full context once the text allows it


def test_token_windows_reject_bad_geometry():
    for window, stride in [(1, 1), (8, 8), (8, 0)]:
        with pytest.raises(InvalidRequestError):
            token_windows(10, window, stride)


TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


def naive_perplexity(model, text: str) -> float:
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model.model(input_ids=ids).logits.float(), -1)
    nll = -logp[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
    return math.exp(nll.double().mean().item())


def test_perplexity_single_window_matches_naive_forward_tiny(tiny):
    n_ids = len(tiny.tokenizer(TEXT)["input_ids"])
    got = perplexity(tiny, text=TEXT, max_tokens=None, window=128, progress=False)
    assert got.n == n_ids - 1 and got.details["windows"] == 1
    assert got.value == pytest.approx(naive_perplexity(tiny, TEXT), rel=1e-5)
    assert got.higher_is_better is False and got.name == "perplexity"
    assert got.value == pytest.approx(math.exp(got.details["mean_nll"]))
    # A tiny random model is close to uniform over its 49,152-token vocabulary.
    assert 0.5 * 49152 < got.value < 2 * 49152


def test_perplexity_windows_budget_and_batch_invariance_tiny(tiny):
    ref = perplexity(tiny, text=TEXT, max_tokens=30, window=8, stride=5, batch_size=1, progress=False)
    assert ref.n == 30 and ref.details["windows"] == 6
    for bs in (3, 8):
        got = perplexity(tiny, text=TEXT, max_tokens=30, window=8, stride=5, batch_size=bs, progress=False)
        assert got.value == pytest.approx(ref.value, rel=1e-5)
    assert "window" in ref.protocol and "30 predicted tokens" in ref.protocol


def test_perplexity_rejects_bad_input_tiny(tiny):
    with pytest.raises(InvalidRequestError):
        perplexity(tiny, text="Hi", max_tokens=None, window=8, progress=False)  # one token
    with pytest.raises(InvalidRequestError):
        perplexity(tiny, text=TEXT, window=4096, progress=False)  # tiny context is 512
    with pytest.raises(InvalidRequestError):
        perplexity(tiny, text=TEXT, window=8, stride=8, progress=False)
    with pytest.raises(InvalidRequestError):
        perplexity(tiny, text=TEXT, max_tokens=0, progress=False)
    with pytest.raises(InvalidRequestError):
        perplexity(tiny, text=TEXT, batch_size=0, progress=False)


def test_wikitext_text_is_the_shipped_raw_test_split():
    text = wikitext2_test_text()
    # The shipped copy has CRLF line ends (1,290,547 bytes); reading normalises them to "\n".
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is an English film")
    assert "\r" not in text and text.count("\n") == 2891
    assert len(text.encode("utf-8")) == 1_290_547 - 2891


# --------------------------------------------------------------------------- fluency


def test_fluency_wiring_tiny(tiny):
    prompts = ["The capital of France is", "The capital of France is", "My favourite food is"]
    texts = generation_texts(tiny, prompts, max_new_tokens=6)
    assert len(texts) == 3 and texts[0] == texts[1]
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts))
    score = fluency(tiny, prompts, max_new_tokens=6, progress=False)
    assert score.n == 3 and score.details["distinct_prompts"] == 2
    assert score.value == pytest.approx(ngram_entropy(texts))
    assert score.details["rome_scale"] == pytest.approx(100 * score.value)
    with pytest.raises(InvalidRequestError):
        fluency(tiny, [], progress=False)


# --------------------------------------------------------------------------- real SmolLM2


@pytest.mark.model
def test_piqa_real_model_first_40(real_model):
    score = piqa_accuracy(real_model, n=40, progress=False)
    assert score.n == 40 and 0.0 <= score.value <= 1.0
    # SmolLM2-135M is well above chance on PIQA (~0.67 on all 1,838); these 40 fixed
    # items are deterministic, and a broken prompt/target alignment lands near 0.5.
    assert score.value >= 0.6


@pytest.mark.model
def test_wikitext_perplexity_real_model(real_model):
    score = perplexity(real_model, max_tokens=2048, progress=False)
    # SmolLM2-135M scores ~20 here (20.5 measured; 22.7 on the default 16k tokens). A
    # uniform guess over the vocabulary is 49,152 and targets shifted by one position give
    # hundreds or more; below ~5 a 135M model would have to be seeing the tokens it predicts.
    assert score.n == 2048 and score.details["windows"] == 3 and math.isfinite(score.value)
    assert 5 < score.value < 200


@pytest.mark.model
@pytest.mark.slow
def test_piqa_and_perplexity_batch_invariance_real_model(real_model):
    items = load_piqa(16)
    one = piqa_predictions(real_model, items, batch_size=1)
    eight = piqa_predictions(real_model, items, batch_size=8)
    assert [p.choice for p in one] == [p.choice for p in eight]
    for a, b in zip(one, eight):
        assert a.logprob_sums == pytest.approx(b.logprob_sums, abs=1e-3)
    ppl = [perplexity(real_model, max_tokens=600, window=256, batch_size=bs, progress=False).value for bs in (1, 3)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


@pytest.mark.model
def test_fluency_real_model(real_model):
    score = fluency(real_model, ["The Eiffel Tower is located in", "My favourite hobby is"], max_new_tokens=40,
                    progress=False)
    # Fluent 40-token continuations have ~30-45 distinct bigrams/trigrams (entropy ~5 bits);
    # a model stuck repeating one token scores ~0.
    assert 3.0 < score.value < 7.0
