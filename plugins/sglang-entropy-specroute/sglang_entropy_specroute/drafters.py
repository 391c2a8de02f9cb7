"""Domain-specialised drafter models for TAPS speculative-draft routing, built on CPU.

Each drafter is a small ``LlamaForCausalLM`` that shares SmolLM2-135M-Instruct's tokenizer and
vocabulary (SGLang's STANDALONE speculative worker requires the draft and target vocabularies to be
equal). It starts as a *layer-skip* copy of the target (embeddings, tied lm_head, final norm and the
first ``layers`` decoder layers) and is then fine-tuned on the target's own greedy answers in one
domain, with a next-token loss on the answer tokens only. Training on the target's greedy tokens is
exactly what greedy speculative verification rewards: a draft token is accepted when it equals the
target's argmax.

Domains and fixed prompt splits (the split never depends on how many prompts a build uses: a build
takes the first N of each split):

* ``math``: GSM8K test questions read from ``/work/shared/data/gsm8k_test.jsonl`` (1319 lines).
  Lines 0-899 train, 900-999 validate (held-out agreement), 1000-1318 are left for benchmarks and
  are never read here.
* ``chat``: general chat prompts made from ``CHAT_TEMPLATES`` x ``CHAT_TOPICS`` (no external data),
  shuffled with a fixed seed. Prompts 0-899 train, 900-999 validate, 1000 and beyond benchmark.

Build everything with ``build_drafters()`` or ``python -m sglang_entropy_specroute.drafters``.
The generated corpus is cached under ``sglang_entropy.tools.model.cache_dir() / "specroute-corpus"``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

GSM8K_PATH = Path(os.environ.get("SGLANG_ENTROPY_GSM8K", "/work/shared/data/gsm8k_test.jsonl"))
DOMAINS = ("math", "chat")
# [start, stop) prompt indices of each split, the same for both domains.
SPLITS = {"train": (0, 900), "valid": (900, 1000), "bench": (1000, None)}
MATH_INSTRUCTION = "Solve this math word problem step by step, then give the final answer.\n\n"
CHAT_SEED = 20260
CORPUS_FORMAT = 1

CHAT_TEMPLATES = (
    "Explain {topic} to a curious beginner.",
    "What are three interesting facts about {topic}?",
    "Write a short poem about {topic}.",
    "Give me some practical advice about {topic}.",
    "Why do people care about {topic}?",
    "Write a short story that involves {topic}.",
    "What is a common misconception about {topic}?",
    "Summarise the history of {topic} in a few sentences.",
    "How would you describe {topic} to a child?",
    "What are the pros and cons of {topic}?",
    "Can you recommend a way to learn more about {topic}?",
    "Write a friendly email to a colleague about {topic}.",
    "What should a tourist know about {topic}?",
    "Compare {topic} with something from everyday life.",
)
CHAT_TOPICS = (
    "the ocean",
    "coffee",
    "time management",
    "volcanoes",
    "learning a new language",
    "the moon",
    "gardening",
    "public libraries",
    "bicycles",
    "friendship",
    "rainforests",
    "chess",
    "jazz music",
    "cooking pasta",
    "sleep",
    "the internet",
    "bees",
    "solar energy",
    "ancient Egypt",
    "museums",
    "running a marathon",
    "photography",
    "trains",
    "recycling",
    "dogs",
    "cats",
    "the weather",
    "mountains",
    "board games",
    "public speaking",
    "the human heart",
    "dinosaurs",
    "painting",
    "city parks",
    "tea",
    "the stock market",
    "space travel",
    "birds",
    "winter holidays",
    "yoga",
    "electric cars",
    "bread baking",
    "honesty",
    "robots",
    "the desert",
    "clean water",
    "kindness",
    "online privacy",
    "soccer",
    "the printing press",
    "rivers",
    "meditation",
    "origami",
    "castles",
    "volunteering",
    "camping",
    "the piano",
    "vaccines",
    "coral reefs",
    "writing a diary",
    "climate change",
    "chocolate",
    "the Olympic Games",
    "lighthouses",
    "bridges",
    "maps",
    "budgeting money",
    "first aid",
    "penguins",
    "the Renaissance",
    "video games",
    "spices",
    "working from home",
    "forests in autumn",
    "the telephone",
    "whales",
    "comic books",
    "healthy breakfasts",
    "airports",
    "the alphabet",
    "hiking",
    "science fiction",
    "teamwork",
    "thunderstorms",
    "farmers markets",
    "ice cream",
    "old bookshops",
    "the color blue",
)


# ---------------------------------------------------------------------------------------------
# Prompts


def _split_slice(split: str, n: int | None) -> slice:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    start, stop = SPLITS[split]
    if n is not None:
        stop = start + n if stop is None else min(stop, start + n)
    return slice(start, stop)


def math_prompts(split: str, n: int | None = None, path: Path = GSM8K_PATH) -> list[str]:
    """GSM8K questions of ``split`` (the first ``n``), wrapped in a fixed instruction."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the math drafter reads GSM8K test questions from it")
    with open(path) as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    return [MATH_INSTRUCTION + q for q in questions[_split_slice(split, n)]]


def chat_prompts(split: str, n: int | None = None) -> list[str]:
    """General chat prompts of ``split``: every template x topic pair, in a fixed shuffled order."""
    pairs = [t.format(topic=topic) for topic in CHAT_TOPICS for t in CHAT_TEMPLATES]
    random.Random(CHAT_SEED).shuffle(pairs)
    return pairs[_split_slice(split, n)]


def domain_prompts(domain: str, split: str, n: int | None = None) -> list[str]:
    if domain == "math":
        return math_prompts(split, n)
    if domain == "chat":
        return chat_prompts(split, n)
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt in the target's chat template, ending with the assistant header."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


# ---------------------------------------------------------------------------------------------
# Corpus: the target's own greedy answers


def _trim_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def generate_hf(model_path: Path, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16, progress=print):
    """Greedy answers with transformers (left-padded batches); each answer ends at the first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        answers += [_trim_at_eos(row[width:].tolist(), tokenizer.eos_token_id) for row in out]
        progress(f"  generated {len(answers)}/{len(prompts)} answers")
    return answers


def generate_sglang(
    model_path: Path, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32, progress=print
):
    """Greedy answers from the real SGLang server on this machine (faster than transformers on CPU)."""
    import requests

    from sglang_entropy.tools import server as sglang_server

    answers = []
    with sglang_server.launch(model_path, enable_entropy=False) as server:
        for start in range(0, len(prompts), batch_size):
            body = {
                "input_ids": prompts[start : start + batch_size],
                "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens},
            }
            response = requests.post(f"{server.url}/generate", json=body, timeout=3600)
            if response.status_code != 200:
                raise RuntimeError(f"SGLang /generate answered {response.status_code}: {response.text[:500]}")
            answers += [list(o["output_ids"]) for o in response.json()]
            progress(f"  generated {len(answers)}/{len(prompts)} answers")
    return answers


GENERATORS = {"hf": generate_hf, "sglang": generate_sglang}


def _model_fingerprint(model_path: Path) -> str:
    weights = Path(model_path) / "model.safetensors"
    stat = weights.stat() if weights.exists() else None
    return f"{Path(model_path).resolve()}:{stat.st_size if stat else 0}:{int(stat.st_mtime) if stat else 0}"


def corpus_path(domain: str, split: str, n: int, max_new_tokens: int, generator: str, model_path: Path) -> Path:
    from sglang_entropy.tools.model import cache_dir

    key = json.dumps([CORPUS_FORMAT, domain, split, n, max_new_tokens, generator, _model_fingerprint(model_path)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "specroute-corpus" / f"{domain}-{split}-{n}-{max_new_tokens}-{generator}-{digest}.jsonl"


def load_or_generate_corpora(
    wanted: Sequence[tuple[str, str, int]],
    model_path: Path,
    tokenizer,
    max_new_tokens: int = 256,
    generator: str = "sglang",
    progress=print,
) -> dict[tuple[str, str], list[dict]]:
    """For each ``(domain, split, n)``: records ``{"prompt", "prompt_ids", "response_ids"}`` with the
    target's greedy answers to the first ``n`` prompts, from the cache or generated in one pass (a
    single server launch for every missing corpus)."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; expected one of {sorted(GENERATORS)}")
    corpora, missing = {}, []
    for domain, split, n in wanted:
        path = corpus_path(domain, split, n, max_new_tokens, generator, model_path)
        if path.exists():
            with open(path) as f:
                corpora[(domain, split)] = [json.loads(line) for line in f]
            continue
        prompts = domain_prompts(domain, split, n)
        if len(prompts) < n:
            raise ValueError(f"the {domain}/{split} split has only {len(prompts)} prompts, {n} asked")
        missing.append((domain, split, path, prompts, [prompt_ids(tokenizer, p) for p in prompts]))
    if missing:
        all_ids = [ids for *_, ids in missing for ids in ids]
        names = ", ".join(f"{d}/{s}" for d, s, *_ in missing)
        progress(f"generating {len(all_ids)} answers ({names}) with {generator}, at most {max_new_tokens} tokens")
        answers = iter(GENERATORS[generator](model_path, all_ids, max_new_tokens, progress=progress))
        for domain, split, path, prompts, ids in missing:
            records = [
                {"prompt": p, "prompt_ids": i, "response_ids": next(answers)} for p, i in zip(prompts, ids, strict=True)
            ]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
            tmp.rename(path)  # a killed run leaves no half-written corpus behind
            corpora[(domain, split)] = records
    return corpora


# ---------------------------------------------------------------------------------------------
# Model


def layer_skip_init(target, layers: int):
    """A ``LlamaForCausalLM`` with the target's embeddings, final norm and first ``layers`` decoder
    layers (copies, not shared tensors); the lm_head stays tied to the embeddings like the target's."""
    from transformers import LlamaForCausalLM

    total = target.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"a drafter needs 1..{total} layers, got {layers}")
    config = target.config.__class__.from_dict(target.config.to_dict())
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    drafter = LlamaForCausalLM(config).to(target.dtype)
    kept = {"model.embed_tokens.weight", "model.norm.weight"}
    state = {
        name: tensor.clone()
        for name, tensor in target.state_dict().items()
        if name in kept or (name.startswith("model.layers.") and int(name.split(".")[2]) < layers)
    }
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" and "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"layer-skip init: missing {missing}, unexpected {unexpected}")
    drafter.tie_weights()
    return drafter


def response_example(prompt: Sequence[int], response: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Inputs and labels for a next-token loss on the response only: labels are -100 on the prompt,
    so the loss counts exactly the response tokens (the model's shift inside HF does the offset).
    Sequences longer than ``max_len`` keep the whole prompt when they can and drop the answer's tail."""
    ids = list(prompt) + list(response)
    labels = [-100] * len(prompt) + list(response)
    return ids[:max_len], labels[:max_len]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


@torch.no_grad()
def agreement(model, records: list[dict], max_len: int, pad_id: int, batch_size: int = 8) -> float:
    """Teacher-forced next-token agreement: how often the model's argmax after each prefix of a
    target answer equals the target's greedy token there (the first-token acceptance rate)."""
    model.eval()
    hits = total = 0
    examples = [response_example(r["prompt_ids"], r["response_ids"], max_len) for r in records]
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        mask = labels != -100
        hits += (predicted[mask] == labels[mask]).sum().item()
        total += mask.sum().item()
    if total == 0:
        raise ValueError("no response tokens to score")
    return hits / total


# ---------------------------------------------------------------------------------------------
# Training


def response_loss(drafter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (HF's causal-LM loss for these labels),
    with the 49152-way lm_head applied only where a label is: the head is most of a step's cost."""
    hidden = drafter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # [B, T-1]: the token each position predicts
    scored = labels != -100
    logits = drafter.lm_head(hidden[:, :-1][scored])  # [N, V]
    return torch.nn.functional.cross_entropy(logits.float(), labels[scored])


@dataclass
class BuildConfig:
    out_dir: Path = field(default_factory=lambda: default_drafters_dir())
    target: Path | None = None  # None: the default model, built if missing
    domains: tuple[str, ...] = DOMAINS
    # Sized for about 40 minutes on a 2-core CPU (13 min corpus, 25 min training).
    layers: int = 4
    train_prompts: int = 320
    valid_prompts: int = 48
    max_new_tokens: int = 160
    max_len: int = 384
    steps: int = 360
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    generator: str = "sglang"
    seed: int = 0
    threads: int = 2


def default_drafters_dir() -> Path:
    from sglang_entropy.tools.model import cache_dir

    return cache_dir() / "specroute-drafters"


def _lr_at(step: int, config: BuildConfig) -> float:
    # linear warm-up (at most a tenth of the run, so short runs still reach the peak rate), then
    # cosine decay to a tenth of the peak
    warmup = max(1, min(config.warmup, config.steps // 10))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_drafter(drafter, records: list[dict], config: BuildConfig, pad_id: int, progress=print) -> list[float]:
    """Fine-tune the decoder layers and final norm (embeddings and the tied lm_head stay frozen)."""
    drafter.train()
    drafter.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    examples = [response_example(r["prompt_ids"], r["response_ids"], config.max_len) for r in records]
    examples = [e for e in examples if any(label != -100 for label in e[1])]
    if not examples:
        raise ValueError("no training example has a response token inside max_len")
    rng = random.Random(config.seed)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            refill = list(range(len(examples)))
            rng.shuffle(refill)
            order += refill
        batch = collate([examples[i] for i in order[: config.batch_size]], pad_id)
        del order[: config.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = response_loss(drafter, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == config.steps - 1:
            window = losses[-10:]
            progress(
                f"  step {step + 1}/{config.steps} loss {sum(window) / len(window):.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    drafter.eval()
    return losses


def build_drafters(
    out_dir: Path | str | None = None,
    steps: int | None = None,
    progress: Callable[[str], None] = print,
    **overrides,
) -> dict[str, Path]:
    """Build one drafter per domain under ``out_dir/<domain>``; return their folders.

    Each folder is a ``LlamaForCausalLM`` checkpoint with the target's tokenizer and a
    ``drafter_card.json`` that records the build and the agreement of every drafter (and of the
    untrained layer-skip init) with the target on every domain's held-out answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_entropy.tools.model import build_default_model

    config = build_config(out_dir, steps, overrides)
    torch.set_num_threads(config.threads)
    target_path = Path(config.target) if config.target else build_default_model(progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    wanted = [
        (domain, split, n)
        for domain in config.domains
        for split, n in (("train", config.train_prompts), ("valid", config.valid_prompts))
    ]
    corpus = load_or_generate_corpora(
        wanted, target_path, tokenizer, config.max_new_tokens, config.generator, progress=progress
    )
    timings["corpus_s"] = time.perf_counter() - t0

    # train in float32 (bf16 AdamW on CPU loses small updates), save in the target's bf16
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    matrix: dict[str, dict[str, float]] = {}
    init = layer_skip_init(target, config.layers)
    matrix["layer-skip init"] = {
        d: agreement(init, corpus[(d, "valid")], config.max_len, pad_id) for d in config.domains
    }
    progress(f"layer-skip init agreement: {matrix['layer-skip init']}")

    drafters, losses = {}, {}
    for domain in config.domains:
        drafters[domain], losses[domain] = train_domain(domain, target, corpus, config, pad_id, timings, progress)
        matrix[domain] = {
            d: agreement(drafters[domain], corpus[(d, "valid")], config.max_len, pad_id) for d in config.domains
        }
        progress(f"{domain} drafter agreement: {matrix[domain]}")

    out_paths = {}
    for domain, drafter in drafters.items():
        folder = Path(config.out_dir) / domain
        folder.mkdir(parents=True, exist_ok=True)
        drafter.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        card = drafter_card(domain, drafter, config, target_path, losses[domain], matrix, timings)
        (folder / "drafter_card.json").write_text(json.dumps(card, indent=2) + "\n")
        out_paths[domain] = folder
        progress(f"saved {folder}")
    return out_paths


def build_config(out_dir, steps, overrides) -> "BuildConfig":
    config = BuildConfig(**overrides)
    if out_dir is not None:
        config.out_dir = Path(out_dir)
    if steps is not None:
        config.steps = steps
    for domain in config.domains:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return config


def train_domain(domain: str, target, corpus, config, pad_id: int, timings: dict, progress):
    """One domain's drafter, from the layer-skip init of ``target``, and its training losses."""
    progress(f"training the {domain} drafter ({config.layers} layers, {config.steps} steps)")
    torch.manual_seed(config.seed)
    drafter = layer_skip_init(target, config.layers)
    t0 = time.perf_counter()
    losses = train_drafter(drafter, corpus[(domain, "train")], config, pad_id, progress)
    timings[f"train_{domain}_s"] = time.perf_counter() - t0
    return drafter, losses


def drafter_card(domain: str, drafter, config, target_path, losses: list[float], matrix, timings) -> dict:
    """What a drafter's folder says of its build: init, training, splits, loss and agreement."""
    tail = losses[-20:]
    return {
        "what": f"{domain} drafter for SmolLM2-135M-Instruct (TAPS speculative-draft routing)",
        "architecture": "LlamaForCausalLM",
        "layers": config.layers,
        "vocab_size": drafter.config.vocab_size,
        "init": f"layer-skip copy of the target's embeddings, final norm and first {config.layers} layers",
        "training": (
            "next-token cross-entropy on the target's own greedy answers (response tokens only), "
            "embeddings and tied lm_head frozen, AdamW, warm-up then cosine decay"
        ),
        "target": str(target_path),
        "domain": domain,
        "splits": {
            d: {"train": [0, config.train_prompts], "valid": [900, 900 + config.valid_prompts]} for d in config.domains
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "train_loss_first": losses[0],
        "train_loss_last20": sum(tail) / len(tail),
        "agreement": matrix,
        "timings_s": timings,
    }


def format_matrix(matrix: dict[str, dict[str, float]]) -> str:
    domains = list(next(iter(matrix.values())))
    head = f"| drafter \\ held-out domain | {' | '.join(domains)} |"
    rule = "|" + "---|" * (len(domains) + 1)
    rows = [f"| {name} | " + " | ".join(f"{row[d]:.3f}" for d in domains) + " |" for name, row in matrix.items()]
    return "\n".join([head, rule, *rows])


def main(argv: Sequence[str] | None = None) -> int:
    defaults = BuildConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="sglang-entropy-drafters")
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir)
    parser.add_argument("--target", type=Path, default=None, help="target model folder (default: SmolLM2-135M)")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--train-prompts", type=int, default=defaults.train_prompts)
    parser.add_argument("--valid-prompts", type=int, default=defaults.valid_prompts)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--max-len", type=int, default=defaults.max_len)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--generator", choices=sorted(GENERATORS), default=defaults.generator)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--report", type=Path, help="also write the agreement matrix and timings as Markdown here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build_drafters(
        out_dir=args.out_dir,
        steps=args.steps,
        target=args.target,
        domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
        layers=args.layers,
        train_prompts=args.train_prompts,
        valid_prompts=args.valid_prompts,
        max_new_tokens=args.max_new_tokens,
        max_len=args.max_len,
        batch_size=args.batch_size,
        lr=args.lr,
        generator=args.generator,
        seed=args.seed,
        threads=args.threads,
    )
    card = json.loads((next(iter(paths.values())) / "drafter_card.json").read_text())
    print(format_matrix(card["agreement"]))
    print(f"timings: {card['timings_s']}; total {time.perf_counter() - start:.0f} s")
    if args.report:
        write_report(args.report, card, time.perf_counter() - start, argv)
    return 0


def write_report(path: Path, card: dict, seconds: float, argv: Sequence[str] | None) -> None:
    """The build's command, settings, agreement matrix and timings as Markdown."""
    import shlex
    import sys

    command = "sglang-entropy-drafters " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    config = card["config"]
    timings = ", ".join(f"{k.removesuffix('_s')} {v / 60:.1f} min" for k, v in card["timings_s"].items())
    lines = [
        "# TAPS drafters: agreement with the target on held-out answers",
        "",
        f"Command: `{command}`",
        "",
        f"Each drafter: {card['init']}, then {config['steps']} steps of batch {config['batch_size']} "
        f"(lr {config['lr']}) of {card['training']}. Corpus: the target's greedy answers "
        f"(at most {config['max_new_tokens']} tokens, generator `{config['generator']}`) to "
        f"{config['train_prompts']} training prompts per domain; agreement is scored on "
        f"{config['valid_prompts']} validation prompts per domain.",
        "",
        "Teacher-forced next-token agreement with the target's greedy token (the rate at which a "
        "drafter's first draft token would be accepted):",
        "",
        format_matrix(card["agreement"]),
        "",
        f"Timings (2-core CPU): {timings}; {seconds / 60:.1f} min in all.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
