"""Constrained decoding (engine/constraints.py): the rules on synthetic logits against HF's own
processors, and on the tiny Qwen2-VL through both decoders (HF generate and the static-cache greedy
decoder, eager on CPU; the CUDA-graph replay of the same step is tested on a GPU)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from jpcap_helpers import engine
from jpcap_helpers.data import toy as toydata
from jpcap_helpers.engine import constraints as C
from jpcap_helpers.engine import decode, generation
from jpcap_helpers.models import REGISTRY, build_tiny_model
from jpcap_helpers.params import ConstraintParams, Params, ParamsError, TinyModelParams

ENTRY = REGISTRY["tiny-qwen2-vl"]
NEG = float("-inf")


def _banned(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row == NEG).flatten().tolist()) for row in logits]


def test_sequence_ban_and_no_repeat_match_hf_processors():
    from transformers import NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor

    gen = torch.Generator().manual_seed(0)
    vocab, seqs = 12, [(3, 4), (5, 6, 7), (8, 1)]
    cons = C.Constraints(vocab, {}, [(s, NEG) for s in seqs])
    bad = NoBadWordsLogitsProcessor([list(s) for s in seqs], eos_token_id=11)
    for k in (1, 2, 3):
        ngram = C.Constraints(vocab, {}, [], no_repeat_ngram_size=k)
        ref = NoRepeatNGramLogitsProcessor(k)
        for length in range(0, 9):
            ids = torch.randint(0, 9, (4, length), generator=gen)
            buf = torch.cat([ids, torch.full((4, 3), 2)], 1)   # stale tokens past n_generated are ignored
            scores = torch.zeros(4, vocab)
            assert _banned(ngram.apply(scores, buf, length)) == _banned(ref(ids, scores.clone())), (k, length)
            if k == 1:
                assert _banned(cons.apply(scores, buf, length)) == _banned(bad(ids, scores.clone())), length


def test_bias_and_penalty_values():
    cons = C.Constraints(6, {1: NEG, 2: -3.0}, [((4, 5), -2.0)])
    out = cons.apply(torch.zeros(2, 6), torch.tensor([[4, 0], [0, 4]]), 2)
    assert out[0].tolist() == [0, NEG, -3.0, 0, 0, 0]
    assert out[1].tolist() == [0, NEG, -3.0, 0, 0, -2.0]   # only the row that just wrote 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_engine import scramble_weights
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root = tmp_path_factory.mktemp("cons")
    data = root / "data"
    toydata.generate_jp_shapes(data, n_train=16, n_val=12, n_yj=4)
    model_dir = build_tiny_model(root / "models" / "tiny", toydata.all_caption_texts(data), TinyModelParams(),
                                 56 * 56, 112 * 112)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    scramble_weights(model)
    processor = AutoProcessor.from_pretrained(model_dir)
    val = json.loads((data / "stair_captions_v1.2_val.json").read_text(encoding="utf-8"))
    records = [{"image_id": im["id"], "file_name": f"val2014/{im['file_name']}"} for im in val["images"]]
    by_size: dict = {}
    for r in records:
        im = engine.load_image_for_model(data / r["file_name"])
        by_size.setdefault(im.size, []).append(im)
    images = max(by_size.values(), key=len)[:6]
    prompt = engine.build_prompt(ENTRY, processor)
    inputs = generation.prepare_inputs(processor, [prompt] * len(images), images)
    return {"model": model, "processor": processor, "inputs": inputs, "data": data, "records": records}


def _both(tiny, cons, n=40):
    """(HF generate with the constraint processor, the fast decoder) new tokens, no end token."""
    model, inputs = tiny["model"], tiny["inputs"]
    pad = model.generation_config.pad_token_id
    cfg = generation.generation_config(model, n, 1, [], pad)
    hf_dec = generation.Decoder(model, ENTRY, cfg, 8, "hf", constraints=cons)
    fast = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=8, constraints=cons).generate(inputs, n)
    return hf_dec(inputs), fast


def _has(row: list[int], seq: tuple[int, ...]) -> bool:
    return any(tuple(row[i:i + len(seq)]) == seq for i in range(len(row) - len(seq) + 1))


def test_bans_change_exactly_the_targeted_tokens_in_both_decoders(tiny):
    ref, ref_fast = _both(tiny, None)
    assert torch.equal(ref, ref_fast)
    rows = ref.tolist()
    # a single token some rows emit and some do not
    counts = {t: sum(t in r for r in rows) for r in rows for t in r}
    token = next(t for t, c in counts.items() if 0 < c < len(rows))
    bigram = (rows[0][2], rows[0][3])
    assert any(not _has(r, bigram) for r in rows)
    for cons, hit in ((C.Constraints(10**4, {token: NEG}, []), lambda r: token in r),
                      (C.Constraints(10**4, {}, [(bigram, NEG)]), lambda r: _has(r, bigram)),
                      (C.Constraints(10**4, {}, [], no_repeat_ngram_size=1), lambda r: len(set(r)) < len(r))):
        hf, fast = _both(tiny, cons)
        assert torch.equal(hf, fast), "both decoders apply the same rule"
        for before, after in zip(rows, hf.tolist()):
            assert not hit(after), "the banned token / sequence / repeat never appears"
            if not hit(before):
                assert after == before, "captions without the banned tokens are unchanged"
        assert any(hit(r) for r in rows) and hf.tolist() != rows, "the ban had something to remove"


def test_build_constraints_counts_bad_terms_and_keeps_special_tokens(tiny):
    tok = engine.prompts.tokenizer_of(tiny["processor"])
    eos = engine.stop_token_ids(tiny["model"], tiny["processor"], ENTRY)
    cfg = {"ban_scripts": ["latin", "hangul"], "word_list": "gendered",
           "ban_words": ["四角", "四角", "<|im_end|>", " ", "赤"], "no_repeat_ngram_size": 3}
    cons = C.build_constraints(tok, cfg, eos)
    r = cons.report
    assert r.n_duplicates == 1 and set(r.skipped) == {"<|im_end|>", "' '"}
    assert "special" in r.skipped["<|im_end|>"] and "empty" in r.skipped["' '"]
    assert len(r.single_token) + len(r.multi_token) == len(C.gendered_terms()) + 2
    assert r.n_script_tokens["latin"] >= 52 and r.n_script_tokens["hangul"] == 0
    bias = cons.bias
    for i in eos:
        assert bias[i] == 0
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    for i, text in enumerate(texts):
        if any(c.isascii() and c.isalpha() for c in text) and i not in tok.all_special_ids:
            assert bias[i] == NEG, text
        if text.strip() and all(c.isdigit() or c in "。、 ー" for c in text):
            assert bias[i] == 0, text
    assert C.describe(cons)["skipped_terms"] == r.skipped
    assert C.build_constraints(tok, ConstraintParams(), eos) is None
    with pytest.raises(ValueError, match="unknown script"):
        C.token_script_mask(tok, ["klingon"])


def test_constraint_params_are_validated():
    p = Params.from_dict({"generation": {"constraints": {"ban_scripts": ["latin"], "no_repeat_ngram_size": 3}}})
    assert p.generation.constraints.ban_scripts == ["latin"]
    for bad, match in (({"ban_scripts": ["elvish"]}, "ban_scripts"), ({"word_penalty": -1}, "word_penalty"),
                       ({"no_repeat_ngram_size": 40}, "no_repeat"), ({"ban_words": ["男", ""]}, r"ban_words\[1\]"),
                       ({"words": []}, "unknown key generation.constraints.words")):
        with pytest.raises(ParamsError, match=match):
            Params.from_dict({"generation": {"constraints": bad}})


def test_caption_records_records_the_constraints(tiny, tmp_path):
    model, processor = tiny["model"], tiny["processor"]
    records = tiny["records"][:6]
    cfg = ConstraintParams(ban_scripts=["latin"], ban_words=["四角"], no_repeat_ngram_size=2)
    kw = dict(batch_size=4, max_new_tokens=10, progress=False, constraints=cfg)
    fast = engine.caption_records(model, processor, ENTRY, records, tiny["data"], tmp_path / "f.jsonl", **kw)
    hf = engine.caption_records(model, processor, ENTRY, records, tiny["data"], tmp_path / "h.jsonl", decoder="hf", **kw)
    assert hf["decoder"] == "hf generate" and hf["constraints"] == fast["constraints"]
    assert fast["constraints"]["ban_words"] == ["四角"] and fast["constraints"]["no_repeat_ngram_size"] == 2
    read = lambda p: {r["image_id"]: r["caption"] for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    assert read(tmp_path / "f.jsonl") == read(tmp_path / "h.jsonl")
    assert not any("四角" in c for c in read(tmp_path / "f.jsonl").values())
    meta = engine.write_prediction_meta(tmp_path / "f.jsonl", ENTRY, fast)
    assert json.loads(meta.read_text())["generation"]["constraints"]["ban_scripts"] == ["latin"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_gpu_graph_replay_applies_the_constraints(tiny):
    model = copy.deepcopy(tiny["model"]).to("cuda")
    inputs = tiny["inputs"]
    pad = model.generation_config.pad_token_id
    cons = C.Constraints(10**4, {}, [], no_repeat_ngram_size=2)
    eager = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=8, cuda_graphs=False, constraints=cons)
    graphs = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=8, constraints=cons)
    assert graphs.cuda_graphs
    a, b = eager.generate(inputs, 12).cpu(), graphs.generate(inputs, 12).cpu()
    assert graphs.n_graph_captures == 1 and torch.equal(a, b)
    cpu = decode.GreedyDecoder(tiny["model"], eos_ids=[], pad_id=pad, max_batch=8, constraints=cons).generate(inputs, 12)
    assert (a == cpu).float().mean() > 0.9   # fp32 CPU vs GPU: the same captions up to rare ties


def test_meta_marks_a_file_resumed_under_other_constraints(tmp_path, capsys):
    pred = tmp_path / "m__test.jsonl"
    pred.write_text("")
    base = {"batch_size": 1, "num_beams": 1, "max_new_tokens": 4, "n_skipped_existing": 0, "constraints": None}
    engine.write_prediction_meta(pred, ENTRY, base)
    engine.write_prediction_meta(pred, ENTRY, {**base, "n_skipped_existing": 3})   # same setting: fine
    assert "constraints_mixed" not in json.loads(pred.with_suffix(".meta.json").read_text())["generation"]
    engine.write_prediction_meta(pred, ENTRY, {**base, "n_skipped_existing": 3, "constraints": {"ban_scripts": ["latin"]}})
    assert json.loads(pred.with_suffix(".meta.json").read_text())["generation"]["constraints_mixed"] is True
    assert "delete the file" in capsys.readouterr().out
    engine.write_prediction_meta(pred, ENTRY, {**base, "n_skipped_existing": 5, "constraints": {"ban_scripts": ["latin"]}})
    assert json.loads(pred.with_suffix(".meta.json").read_text())["generation"]["constraints_mixed"] is True


class _CharTokenizer:
    """Characters as tokens; anything outside the vocabulary is the unknown token (id 0)."""
    all_special_ids = [0, 1]
    unk_token_id = 0

    def __init__(self, chars: str):
        self.vocab = ["<unk>", "</s>", *chars]

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.index(c) if c in self.vocab else 0 for c in text]

    def batch_decode(self, ids, **_kw):
        return ["".join(self.vocab[i] for i in row) for row in ids]


def test_untokenizable_terms_are_skipped_and_counted():
    tok = _CharTokenizer("男性女 aЖ한1。")
    cons = C.build_constraints(tok, {"ban_words": ["男性", "猫", "女"], "ban_scripts": ["latin", "cyrillic", "hangul"]},
                               eos_ids=[1])
    r = cons.report
    assert r.multi_token == ["男性"] and r.single_token == ["女"]
    assert "unknown token" in r.skipped["猫"] and "猫" in r.summary()
    banned = {tok.vocab[i] for i in range(len(tok)) if cons.bias[i] == NEG}
    assert banned == {"女", "a", "Ж", "한"}          # 1, 。, space, kana-free CJK and the special tokens stay
    assert r.n_script_tokens == {"latin": 1, "cyrillic": 1, "hangul": 1}
