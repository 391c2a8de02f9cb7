"""The TAPS drafter pipeline: layer-skip init, prompts and splits, the response-only loss, agreement,
and a tiny end-to-end build whose drafters transformers loads with the target's vocabulary."""

import json

import pytest
import torch
from sglang_entropy_specroute import drafters
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


def tiny_target(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_layer_skip_init_copies_embeddings_norm_and_first_layers(layers):
    target = tiny_target()
    drafter = drafters.layer_skip_init(target, layers).eval()
    assert drafter.config.num_hidden_layers == layers
    target_state = target.state_dict()
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, target_state[name]), name
    assert drafter.lm_head.weight.data_ptr() == drafter.model.embed_tokens.weight.data_ptr()  # still tied
    # copies: training the drafter must not move the target
    assert drafter.model.layers[0].mlp.up_proj.weight.data_ptr() != target.model.layers[0].mlp.up_proj.weight.data_ptr()

    # functionally: the drafter's logits are the target's lm_head(norm(output of layer `layers`))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        hidden = target(input_ids=ids, output_hidden_states=True).hidden_states[layers]
        expected = target.lm_head(target.model.norm(hidden))
        actual = drafter(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_layer_skip_init_rejects_impossible_depths():
    target = tiny_target()
    for layers in (0, 5):
        with pytest.raises(ValueError, match="1..4 layers"):
            drafters.layer_skip_init(target, layers)


def test_chat_prompts_are_deterministic_and_the_splits_partition_them():
    first, second = drafters.chat_prompts("train"), drafters.chat_prompts("train")
    assert first == second
    splits = {s: drafters.chat_prompts(s) for s in drafters.SPLITS}
    assert [len(splits[s]) for s in ("train", "valid")] == [900, 100]
    every = [t.format(topic=topic) for topic in drafters.CHAT_TOPICS for t in drafters.CHAT_TEMPLATES]
    assert sorted(splits["train"] + splits["valid"] + splits["bench"]) == sorted(every)
    assert len(splits["bench"]) > 100
    assert drafters.chat_prompts("valid", 7) == splits["valid"][:7]


def test_math_prompts_follow_the_fixed_split(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "0"}) + "\n" for i in range(1319)))
    train = drafters.math_prompts("train", path=data)
    valid = drafters.math_prompts("valid", 3, path=data)
    bench = drafters.math_prompts("bench", path=data)
    assert len(train) == 900 and train[0].endswith("q0") and train[-1].endswith("q899")
    assert [v[len(drafters.MATH_INSTRUCTION) :] for v in valid] == ["q900", "q901", "q902"]
    assert len(bench) == 319 and bench[0].endswith("q1000")
    with pytest.raises(ValueError, match="unknown split"):
        drafters.math_prompts("test", path=data)
    with pytest.raises(FileNotFoundError, match="GSM8K"):
        drafters.math_prompts("train", path=tmp_path / "missing.jsonl")


def test_response_labels_cover_exactly_the_response_tokens():
    prompt, response = [5, 6, 7, 8], [9, 10, 11]
    ids, labels = drafters.response_example(prompt, response, max_len=64)
    assert ids == prompt + response
    assert labels == [-100] * 4 + response
    # truncation keeps the alignment and drops the answer's tail
    ids, labels = drafters.response_example(prompt, response, max_len=6)
    assert ids == [5, 6, 7, 8, 9, 10] and labels == [-100] * 4 + [9, 10]


def test_the_training_loss_is_cross_entropy_on_response_tokens_only():
    model = tiny_target(layers=2)
    records = [([3, 4, 5], [6, 7]), ([8, 9], [10, 11, 12, 13])]
    batch = drafters.collate([drafters.response_example(p, r, 64) for p, r in records], pad_id=0)
    assert batch["attention_mask"].sum().item() == 5 + 6
    with torch.no_grad():
        loss = drafters.response_loss(model, batch)
        terms = []
        for prompt, response in records:
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
            for j, token in enumerate(response):
                position = len(prompt) + j - 1  # the logits that predict response[j]
                terms.append(torch.nn.functional.cross_entropy(logits[position : position + 1], torch.tensor([token])))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)  # what HF's own loss gives


def greedy_record(model, prompt: list[int], length: int) -> dict:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(length):
            ids.append(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item())
    return {"prompt_ids": prompt, "response_ids": ids[len(prompt) :]}


def test_agreement_counts_greedy_matches_after_each_answer_prefix():
    model = tiny_target(layers=2)
    records = [greedy_record(model, [1, 2, 3], 5), greedy_record(model, [4, 5], 3)]
    assert drafters.agreement(model, records, max_len=64, pad_id=0) == 1.0
    # change the last answer token of the first record: exactly one of 8 predictions misses
    wrong = dict(records[0], response_ids=records[0]["response_ids"][:-1] + [(records[0]["response_ids"][-1] + 1) % 97])
    assert drafters.agreement(model, [wrong, records[1]], max_len=64, pad_id=0) == pytest.approx(7 / 8)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = drafters.BuildConfig(steps=100, warmup=10, lr=1e-3)
    rates = [drafters._lr_at(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)
    # a short run warms up over a tenth of its steps, not the configured 10
    short = drafters.BuildConfig(steps=20, warmup=10, lr=1e-3)
    assert drafters._lr_at(1, short) == pytest.approx(1e-3)


def test_tiny_build_saves_drafters_that_transformers_loads(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_ENTROPY_CACHE", str(tmp_path / "cache"))  # a fresh corpus cache
    paths = drafters.build_drafters(
        out_dir=tmp_path / "drafters",
        steps=2,
        target=model_path,
        layers=1,
        train_prompts=2,
        valid_prompts=1,
        max_new_tokens=6,
        batch_size=2,
        warmup=1,
        generator="hf",
        progress=lambda _: None,
    )
    assert sorted(paths) == ["chat", "math"]
    target_tokenizer = AutoTokenizer.from_pretrained(model_path)
    for domain, folder in paths.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.vocab_size == 49152 == model.get_input_embeddings().weight.shape[0]
        assert model.config.num_hidden_layers == 1
        assert AutoTokenizer.from_pretrained(folder).get_vocab() == target_tokenizer.get_vocab()
        card = json.loads((folder / "drafter_card.json").read_text())
        assert card["domain"] == domain and card["vocab_size"] == 49152
        assert set(card["agreement"]) == {"layer-skip init", "math", "chat"}
        assert all(0.0 <= v <= 1.0 for row in card["agreement"].values() for v in row.values())
    corpus_files = sorted(
        p.name.split("-")[0] + "/" + p.name.split("-")[1] for p in (tmp_path / "cache").rglob("*.jsonl")
    )
    assert corpus_files == ["chat/train", "chat/valid", "math/train", "math/valid"]
